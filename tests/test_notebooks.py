"""Every notebook in notebooks/ runs top to bottom on small settings, and is stored without outputs.

Each notebook has one cell tagged `parameters`; the test runs a cell of small settings right
after it (papermill's convention), so the notebook's own code is what runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

SMALL = {
    "01_classification_quickstart.ipynb": "EPOCHS = 1\nIMAGE_SIZE = 32\nLIMIT_TRAIN_BATCHES = 3\nWANDB = True",
    "02_segmentation.ipynb": "EPOCHS = 1\nCROP_SIZE = 64\nLIMIT_TRAIN_BATCHES = 2\nLIMIT_VAL_BATCHES = 1\nWANDB = False",
    "03_face_embeddings.ipynb": "EPOCHS = 1\nIMAGE_SIZE = 32\nLIMIT_TRAIN_BATCHES = 3\nWANDB = False",
    # The fallback data (the 1000-image sample), as on a machine without Debian's Fashion-MNIST.
    "04_residual_learning.ipynb": (
        "DATA = 'sample'\nDEPTHS = (8, 14)\nEPOCHS = 1\nTRAIN_SIZE = 256\nTEST_SIZE = 100\n"
        "GRADIENT_DEPTH = 56\nLIGHTNING_STEPS = 4"
    ),
}


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_every_notebook_has_small_settings():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_stored_without_outputs(name):
    for cell in _read(name).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: clear outputs before committing"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, tmp_path, monkeypatch):
    # One compute thread: the DataLoader workers take the other core, and spinning OpenMP
    # threads on an oversubscribed runner are many times slower, not a little.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    Path(os.environ["HOME"]).mkdir(parents=True, exist_ok=True)  # conftest's HOME, for Jupyter's files
    notebook = _read(name)
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    overrides = f"{SMALL[name]}\nRUN_DIR = {str(tmp_path / 'run')!r}"
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(overrides))
    start = time.perf_counter()
    # Started in notebooks/, as Jupyter would be; the notebook finds the repository root itself.
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    if "WANDB = True" in SMALL[name]:  # W&B from a notebook, no login: an offline run, no prompt
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
