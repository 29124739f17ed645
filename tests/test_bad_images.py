"""Bad files at training time (`data.on_bad_image: skip | raise`) on generated bad inputs
(tests/bad_inputs.py): odd images load with the right pixels, broken ones are skipped and
listed, `raise` stops with one line, and `finetune fit` on messy folders finishes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import (
    BROKEN,
    corrupt_png,
    odd_images,
    write_messy_classification,
    write_messy_identities,
    write_messy_segmentation,
)
from conftest import write_colour_images
from PIL import ImageFile

from finetune.data import ImageFolderDataModule
from finetune.data.bad_images import SKIP_LIST, BadFile, BadImageError, read_guarded
from finetune.data.images import read_rgb
from finetune.data.inspection import decode, inspect_header
from finetune.data.screening import screening

REPO = Path(__file__).resolve().parents[1]
TINY_FIT = [
    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--model.pretrained", "false",
    "--model.backbone", "resnet18", "--data.num_workers", "2", "--data.batch_size", "64",
]


def skip_list(run_dir: Path) -> dict[str, dict]:
    with (run_dir / SKIP_LIST).open(encoding="utf-8", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


# --- single files ---------------------------------------------------------------------------

def test_odd_images_load_with_the_right_pixels(tmp_path):
    odd = odd_images(tmp_path)
    assert set(odd) == {"alpha.png", "palette.png", "palette_transparent.png", "depth16.png", "cmyk.jpg", "grey.jpg",
                        "exif_rotated.jpg", "tiny.png"}
    for name, (path, expected, tolerance) in odd.items():
        array = read_rgb(path)
        assert array.dtype == np.uint8 and array.shape == expected.shape, (name, array.shape)
        assert np.abs(array.astype(int) - expected).max() <= tolerance, name
        assert inspect_header(str(path)).problem is None, name
    # and none of them is skipped by the DataModule's checks, which read every pixel here
    for name in ("a", "b"):
        write_colour_images(tmp_path / name, 2, seed=0)  # two more classes: red/green/blue
    for name, (path, _, _) in odd.items():
        path.rename(tmp_path / "a" / name)
    dm = ImageFolderDataModule(str(tmp_path), backbone="resnet18", image_size=16, num_workers=0)
    assert not dm.bad_files.records and dm.screening.full
    assert len(dm.splits.train) + len(dm.splits.val) == 8 + 2 * 3 * 2


@pytest.mark.parametrize("name, reason", [
    ("empty.jpg", "empty file (0 bytes)"),
    ("truncated.jpg", "truncated or corrupt: image file is truncated"),
    ("notes.png", "not an image: text"),
    ("page.jpg", "not an image: HTML"),
    ("bomb.png", "decompression bomb: its header claims 10,000,000,000 pixels"),
    ("large.png", "decompression bomb: its header claims 132,000,000 pixels"),
    ("gone.jpg", "broken symbolic link: points to"),
])
def test_broken_files_are_found_from_their_headers(tmp_path, name, reason):
    path = BROKEN[name](tmp_path / name)
    assert reason in inspect_header(str(path)).problem


def test_corrupt_pixel_data_passes_the_header_and_fails_decoding(tmp_path):
    facts = inspect_header(str(corrupt_png(tmp_path / "c.png")))
    assert facts.problem is None and (facts.height, facts.width) == (24, 24)
    decode(facts)
    assert "broken data stream" in facts.problem


def test_decompression_bombs_are_refused_fast_without_decoding(tmp_path, monkeypatch):
    def decode_nothing(self, *args, **kwargs):
        raise AssertionError("a decompression bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode_nothing)  # where PIL allocates the pixels
    for name in ("bomb.png", "large.png"):  # over twice PIL's limit (it raises) and between (it only warns)
        path = str(BROKEN[name](tmp_path / name))
        start = time.perf_counter()
        assert "decompression bomb" in inspect_header(path).problem  # the DataModule's checks
        with pytest.raises(BadFile, match="exceeds limit"):  # a worker's read, if a file got past them
            read_guarded(read_rgb, path)
        assert time.perf_counter() - start < 1.0


# --- DataModules ----------------------------------------------------------------------------

def test_messy_folder_skips_exactly_the_broken_files_and_keeps_the_odd_ones(tmp_path):
    messy = write_messy_classification(tmp_path / "messy")
    dm = ImageFolderDataModule(str(messy.root), backbone="resnet18", image_size=32, num_workers=0)
    assert set(dm.bad_files.records) == set(messy.skipped)
    listed = {path for path, _ in dm.splits.train + dm.splits.val}
    assert set(messy.loaded) <= listed
    assert not listed & (set(messy.ignored) | set(messy.skipped))
    assert dm.class_names == ["café", "green", "linked class", "red", "sea lion"]  # not "empty class" nor hidden
    assert dm.bad_files.records[str(messy.root / "empty class")][1] == "folder"
    # Headers only (a large set): all found but the corrupt pixel data, which a worker finds.
    with screening("headers"):
        dm = ImageFolderDataModule(str(messy.root), backbone="resnet18", image_size=32, num_workers=0)
    corrupt = str(messy.root / "red" / "corrupt.png")
    assert set(dm.bad_files.records) == set(messy.skipped) - {corrupt}


def test_raise_stops_at_construction_with_one_line(tmp_path):
    messy = write_messy_classification(tmp_path / "messy")
    with pytest.raises(BadImageError) as excinfo:
        ImageFolderDataModule(str(messy.root), backbone="resnet18", num_workers=0, on_bad_image="raise")
    message = str(excinfo.value)
    assert "\n" not in message and "--data.on_bad_image skip" in message
    assert message.split(": ")[0] in messy.skipped and "more unusable files" in message


def test_a_file_that_breaks_while_loading_is_replaced_and_named_by_the_batch(tmp_path):
    write_colour_images(tmp_path, per_class=4, seed=0)
    dm = ImageFolderDataModule(str(tmp_path), backbone="resnet18", image_size=16, num_workers=2, batch_size=8,
                               val_fraction=0.34)
    bad = dm.splits.val[1][0]
    corrupt_png(Path(bad))  # after the checks: as if only its header had been read
    batch = next(iter(dm.val_dataloader()))  # two worker processes
    assert len(batch["image"]) == len(dm.splits.val)  # the batch keeps its size
    assert [json.loads(s) for s in batch["skipped"] if s] == [[[bad, "broken data stream when reading image file"]]]
    assert batch["path"].count(dm.splits.val[2][0]) == 2  # the next image took its place
    batch = dm.on_before_batch_transfer(batch, 0)  # main process: recorded, and out of the batch
    assert "skipped" not in batch and dm.bad_files.records[bad][2] == "loading"
    dm.bad_files.policy, dm.bad_files.records = "raise", {}
    with pytest.raises(BadImageError) as excinfo:
        dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    message = str(excinfo.value)
    assert message.startswith(f"{bad}: broken data stream") and "\n" not in message
    assert "--data.on_bad_image skip" in message and "worker" not in message


# --- `finetune fit` on messy folders ----------------------------------------------------------

def test_finetune_fit_on_the_messy_folder_finishes_and_lists_what_it_skipped(tmp_path, capfd, caplog, monkeypatch):
    """The generator as a script, then `finetune fit` through its entry point (in-process: a
    process of its own adds ~15 s of imports; capfd still sees every process's stderr)."""
    from finetune.commands import main

    subprocess.run([sys.executable, str(REPO / "tests" / "bad_inputs.py"), str(tmp_path / "bad")], check=True,
                   capture_output=True)
    monkeypatch.setattr(sys, "argv", [
        "finetune", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--data.root", str(tmp_path / "bad" / "classification"), "--data.image_size", "32",
        "--trainer.default_root_dir", str(tmp_path / "run"), *TINY_FIT,
    ])
    main()
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "final validation" in out
    messy = write_messy_classification(tmp_path / "expected" / "classification")  # the same files, to compare
    listed = skip_list(tmp_path / "run")
    assert {Path(p).relative_to(tmp_path / "bad") for p in listed} == {
        Path(p).relative_to(tmp_path / "expected") for p in messy.skipped
    }
    # the counted warning (pytest's handler has the log in-process; `finetune` prints it on stderr)
    assert "skipped 9 unusable files" in caplog.text and f"listed in {tmp_path / 'run' / SKIP_LIST}" in caplog.text


def _fit(capfd, config: str, root: Path, run_dir: Path, *extra: str):
    from finetune.cli import create_cli

    create_cli(["fit", "--config", str(REPO / "configs" / config), "--data.root", str(root),
                "--trainer.default_root_dir", str(run_dir), *TINY_FIT, *extra])
    out, err = capfd.readouterr()  # file descriptors: the workers' output too
    assert "Traceback" not in err and "final validation" in out
    return skip_list(run_dir)


def test_fit_skips_what_workers_find_while_loading(tmp_path, capfd):
    messy = write_messy_classification(tmp_path / "messy")
    with screening("headers"):  # as for a large set: pixel data is first read by the workers
        listed = _fit(capfd, "quickstart.yaml", messy.root, tmp_path / "run", "--data.image_size", "32")
    assert set(listed) == set(messy.skipped)
    corrupt = str(messy.root / "red" / "corrupt.png")
    assert listed[corrupt]["found"] == "loading" and listed[corrupt]["reason"] == "broken data stream when reading image file"
    assert {row["found"] for path, row in listed.items() if path != corrupt} == {"setup"}


def test_fit_on_a_messy_segmentation_folder(tmp_path, capfd):
    messy = write_messy_segmentation(tmp_path / "messy")
    with screening("headers"):  # mask labels and corrupt pixels are found by the workers
        listed = _fit(capfd, "segment_quickstart.yaml", messy.root, tmp_path / "run", "--data.crop_size", "32")
    assert set(listed) == set(messy.skipped)
    assert {p for p, row in listed.items() if row["found"] == "loading"} == {
        str(messy.root / "masks" / "bad_labels.png"), str(messy.root / "images" / "corrupt.png")}
    assert listed[str(messy.root / "images" / "no_mask.png")]["kind"] == "mask"


def test_fit_on_a_messy_identity_folder(tmp_path, capfd):
    messy = write_messy_identities(tmp_path / "messy")
    listed = _fit(capfd, "faces_quickstart.yaml", messy.root, tmp_path / "run", "--data.image_size", "32",
                  "--data.pairs_file", "null", "--data.val_fraction", "0.3")
    assert set(listed) == set(messy.skipped)


def test_raise_in_fit_is_one_line_from_the_main_process(tmp_path, capfd, monkeypatch):
    from finetune.commands import main

    write_colour_images(tmp_path / "data", per_class=4, seed=0)
    bad = corrupt_png(tmp_path / "data" / "red" / "red_001.png")
    monkeypatch.setattr(sys, "argv", ["finetune", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
                                      "--data.root", str(tmp_path / "data"), "--data.image_size", "16",
                                      "--trainer.default_root_dir", str(tmp_path / "run"), *TINY_FIT,
                                      "--data.on_bad_image", "raise"])
    with screening("headers"), pytest.raises(SystemExit) as excinfo:
        main()
    message = str(excinfo.value.code)
    assert message.startswith(f"error: {bad}: broken data stream") and message.endswith("--data.on_bad_image skip to train without it")
    assert "\n" not in message and "Traceback" not in capfd.readouterr().err
