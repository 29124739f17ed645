"""`finetune export` (ONNX, TorchScript, safetensors) and `finetune predict --exported`.

One tiny trained checkpoint per task and one export per (task, format), shared by the module.
Tolerances (float32, CPU): exported vs PyTorch max abs diff <= 1e-4 on probabilities and unit
embeddings, <= 1e-4 x max(1, |logit|) on logits; argmax labels identical; a safetensors release
rebuilds bit-identical weights (diff 0).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.data import (
    IdentityFolderDataModule,
    ImageFolderDataModule,
    SegmentationFolderDataModule,
)
from finetune.data.images import read_rgb
from finetune.export.runtime import ExportedModel
from finetune.tasks import ClassificationTask, EmbeddingTask, SegmentationTask

TOLERANCE = 1e-4
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def finetune(*args: str) -> str:
    """`finetune ARGS` through the console script's main(), in-process; returns what it printed."""
    from finetune.commands import main

    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["finetune", *map(str, args)]), contextlib.redirect_stdout(out):
        main()
    return out.getvalue()


def fit(task, dm, path: Path) -> Path:
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, dm)
    trainer.save_checkpoint(path)  # with the DataModule's hyperparameters, as `finetune fit` saves
    return path


@pytest.fixture(scope="module")
def data(colour_folder, shapes_folder, identity_folder):
    """The DataModules the checkpoints are trained on; their eval transforms are the reference."""
    return {
        "classification": ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16,
                                                num_workers=0),
        # pad_multiple 16: the 48 px images are not padded, so Lightning's predict sees what the export sees.
        "segmentation": SegmentationFolderDataModule(str(shapes_folder), backbone="resnet18", crop_size=48,
                                                     batch_size=8, num_workers=0, pad_multiple=16),
        "embedding": IdentityFolderDataModule(str(identity_folder), backbone="resnet18", image_size=32, batch_size=64,
                                              num_workers=0),
    }


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    dms = data
    return {
        "classification": fit(ClassificationTask(3, backbone="resnet18", pretrained=False, class_names=dms["classification"].class_names,
                                                 lr=3e-3), dms["classification"], root / "classification.ckpt"),
        "segmentation": fit(SegmentationTask(3, backbone="resnet18", pretrained=False, class_names=dms["segmentation"].class_names,
                                             optimizer="adamw", lr=3e-3), dms["segmentation"], root / "segmentation.ckpt"),
        "embedding": fit(EmbeddingTask(dms["embedding"].num_classes, backbone="resnet18", pretrained=False, embedding_dim=32,
                                       logit_scale=16.0, margin=0.2, optimizer="adamw", lr=2e-3), dms["embedding"],
                         root / "embedding.ckpt"),
    }


@pytest.fixture(scope="module")
def tasks(checkpoints) -> dict:
    loaders = {"classification": ClassificationTask, "segmentation": SegmentationTask, "embedding": EmbeddingTask}
    return {kind: cls.load_from_checkpoint(checkpoints[kind], map_location="cpu").eval() for kind, cls in loaders.items()}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """exported(kind, format) -> (path, what `finetune export` printed); each made once."""
    root = tmp_path_factory.mktemp("exported")
    made: dict[tuple[str, str], tuple[Path, str]] = {}

    def get(kind: str, file_format: str) -> tuple[Path, str]:
        if (kind, file_format) not in made:
            path = root / f"{kind}{SUFFIX[file_format]}"
            printed = finetune("export", "--ckpt_path", checkpoints[kind], "--format", file_format, "--output", path,
                               "--parity_images", "8")
            made[kind, file_format] = path, printed
        return made[kind, file_format]

    return get


def diffs(printed: str) -> dict[str, float]:
    """The max abs diffs in the export's parity line."""
    line = next(line for line in printed.splitlines() if line.startswith("parity ("))
    assert "FAILED" not in line, line
    return {name: float(value) for name, value in re.findall(r"(\w+) (\d\.\d+e[-+]\d+)", line)}


def training_inputs(dm, images: torch.Tensor) -> torch.Tensor:
    """What the model sees in the DataModule's evaluation: its eval transform's tensors, then its
    on-device step (normalisation, where the DataModule defers it to the device)."""
    return dm.on_after_batch_transfer({"image": images}, 0)["image"].float()


def reference(kind: str, task, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        if kind == "classification":
            return {"probabilities": task(inputs).softmax(dim=1).numpy()}
        if kind == "segmentation":
            probs = task.net.probabilities(inputs)
            return {"probabilities": probs.numpy(), "mask": probs.argmax(dim=1).numpy()}
        return {"embedding": task(inputs).numpy()}


@pytest.mark.parametrize("file_format", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["classification", "segmentation", "embedding"])
def test_parity_with_pytorch_at_batch_1_and_3(kind, file_format, exported, tasks, data):
    path, printed = exported(kind, file_format)
    reported = diffs(printed)  # the export's own check, on 8 sample images
    assert reported and all(value <= TOLERANCE for name, value in reported.items() if name != "logits"), printed
    model = ExportedModel(path)
    dm, task = data[kind], tasks[kind]
    if kind == "segmentation":  # not the size trained or sampled: height and width are dynamic
        crops = [read_rgb(p)[3:43, 1:45] for p, _ in dm.splits.val[:3]]
        images = np.stack(crops)
        inputs = training_inputs(dm, torch.stack([dm.eval_transform()(image=c)["image"] for c in crops]))
    else:  # the DataModule's own validation batch against the runtime's reading of the same files
        batch = next(iter(dm.val_dataloader()))
        images = np.stack([model.preprocess(p) for p in batch["path"][:3]])
        inputs = training_inputs(dm, batch["image"][:3])
    for n in (1, 3):
        got = model.run(images[:n])
        for name, value in reference(kind, task, inputs[:n]).items():
            assert got[name].shape == value.shape, name
            if name == "mask":
                assert (got[name] == value).all()
            else:
                assert np.abs(got[name] - value).max() <= TOLERANCE, name
        if kind == "classification":
            assert (got["probabilities"].argmax(1) == reference(kind, task, inputs[:n])["probabilities"].argmax(1)).all()
        if kind == "embedding":
            np.testing.assert_allclose(np.linalg.norm(got["embedding"], axis=1), 1.0, atol=1e-5)


FRESH_PROCESS = """
import json, sys
import numpy as np
onnx_path, ts_path, image_path = sys.argv[1:4]
image = np.load(image_path)
import onnxruntime as ort
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
onnx_probs = session.run(["probabilities"], {"image": image})[0]
import torch
files = {"metadata.json": ""}
module = torch.jit.load(ts_path, _extra_files=files)
ts_meta = json.loads(files["metadata.json"])
ts_probs = module(torch.from_numpy(image))[list(ts_meta["outputs"]).index("probabilities")].detach().numpy()
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("finetune", "lightning"))
print(json.dumps({"imported": imported, "meta": meta, "ts_meta": ts_meta,
                  "onnx": onnx_probs.tolist(), "torchscript": ts_probs.tolist()}))
"""


def test_exported_files_run_in_a_process_that_never_imports_finetune(exported, data, tmp_path):
    onnx_path, _ = exported("classification", "onnx")
    ts_path, _ = exported("classification", "torchscript")
    model = ExportedModel(onnx_path)
    image = np.stack([model.preprocess(p) for p, _ in data["classification"].splits.val[:2]])
    np.save(tmp_path / "image.npy", image)
    result = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, str(onnx_path), str(ts_path), str(tmp_path / "image.npy")],
                            check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["imported"] == []
    assert out["meta"]["class_names"] == out["ts_meta"]["class_names"] == ["blue", "green", "red"]
    expected = model.run(image)["probabilities"]
    for file_format in ("onnx", "torchscript"):
        assert np.abs(np.array(out[file_format]) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("file_format", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_metadata_round_trips(kind, file_format, exported, checkpoints, data):
    from finetune.export.checkpoint import load_checkpoint
    from finetune.export.metadata import build_metadata, read_metadata

    path, _ = exported(kind, file_format)
    meta = read_metadata(path)
    assert meta == build_metadata(load_checkpoint(checkpoints[kind]), file_format, normalize_in_graph=True)
    dm = data[kind]
    assert meta["task"] == kind and meta["backbone"] == "resnet18" and meta["format"] == file_format
    assert meta["class_names"] == dm.class_names
    assert meta["mean"] == pytest.approx(list(dm.mean)) and meta["std"] == pytest.approx(list(dm.std))
    assert meta["input"]["normalized_in_graph"] is True and list(meta["outputs"])[-1] == "probabilities"
    assert meta["config"]["model"]["init_args"]["lr"] == 3e-3
    assert meta["config"]["data"]["init_args"]["root"] == dm.hparams.root
    if kind == "classification":
        assert meta["input_size"] == [3, 32, 32] and meta["crop_pct"] == dm.crop_pct
    else:
        assert meta["input_size"] is None and meta["min_input_size"] == 16
        assert meta["palette"] == [list(c) for c in dm.class_colors]


@pytest.mark.parametrize("backbone", ["resnet18", "resnext50_32x4d"])
def test_onnx_runs_with_dynamic_batch(backbone, exported, tasks, tmp_path):
    import onnxruntime as ort

    from finetune.export.graph import ExportGraph
    from finetune.export.onnx import export_onnx
    from finetune.export.parity import pytorch_runner

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet values, as the DataModules use
    if backbone == "resnet18":  # the trained checkpoint's export
        path, task = exported("classification", "onnx")[0], tasks["classification"]
    else:
        task = ClassificationTask(4, backbone=backbone, pretrained=False).eval()
        path = export_onnx(ExportGraph(task.net, task.contract.outputs, mean, std), tmp_path / f"{backbone}.onnx",
                           {"task": "classification"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "height", "width", 3]
    reference = pytorch_runner(task.net, task.contract.outputs, mean, std)
    rng = np.random.default_rng(0)
    for shape in ((1, 32, 32, 3), (3, 48, 40, 3)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        probs = session.run(["probabilities"], {"image": images})[0]
        assert probs.shape == (shape[0], task.hparams.num_classes)
        assert np.abs(probs - reference(images)["probabilities"]).max() <= TOLERANCE


def test_predict_exported_writes_what_predict_writes_without_lightning(exported, tasks, data, tmp_path):
    from finetune.callbacks import PredictionWriter

    inputs = {kind: data[kind].splits.val for kind in data}
    folders = {
        "classification": Path(inputs["classification"][0][0]).parents[1],
        "segmentation": Path(inputs["segmentation"][0][0]).parent,
        "embedding": Path(inputs["embedding"][0][0]).parents[1],
    }
    runs = [("classification", "onnx"), ("segmentation", "torchscript"), ("embedding", "onnx")]
    script = "import sys\nfrom finetune.predict_exported import main\n"
    for kind, file_format in runs:
        args = ["--exported", str(exported(kind, file_format)[0]), "--input", str(folders[kind]), "--output", str(tmp_path / kind)]
        script += f"main({args!r})\n"
    script += "assert 'lightning' not in sys.modules, 'lightning was imported'\nprint('no lightning')\n"
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no lightning" in result.stdout

    # The same images through Lightning's predict from the checkpoint, written by our callback.
    for kind in data:
        writer = PredictionWriter(str(tmp_path / f"ckpt_{kind}"))
        dm = data[kind]
        dm.hparams.predict_root = str(folders[kind])
        trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                            default_root_dir=tmp_path)
        trainer.predict(tasks[kind], dm, return_predictions=False)

    exported_rows = list(csv.DictReader((tmp_path / "classification" / "predictions.csv").open()))
    ckpt_rows = list(csv.DictReader((tmp_path / "ckpt_classification" / "predictions.csv").open()))
    assert len(exported_rows) == len(ckpt_rows) == 24 and list(exported_rows[0]) == list(ckpt_rows[0])
    for ours, theirs in zip(exported_rows, ckpt_rows):
        assert (ours["path"], ours["prediction"]) == (theirs["path"], theirs["prediction"])
        assert abs(float(ours["probability"]) - float(theirs["probability"])) <= 1e-4 + 1e-9

    masks = sorted((tmp_path / "segmentation" / "masks").glob("*.png"))
    assert len(masks) == 8 and len(list((tmp_path / "segmentation" / "overlays").glob("*.png"))) == 8
    for mask in masks:
        ours, theirs = np.asarray(Image.open(mask)), np.asarray(Image.open(tmp_path / "ckpt_segmentation" / "masks" / mask.name))
        assert ours.shape == theirs.shape == (48, 48) and (ours == theirs).mean() >= 0.999

    ours, theirs = tmp_path / "embedding", tmp_path / "ckpt_embedding"
    assert (ours / "embeddings.csv").read_text() == (theirs / "embeddings.csv").read_text()
    assert np.abs(np.load(ours / "embeddings.npy") - np.load(theirs / "embeddings.npy")).max() <= TOLERANCE
    assert (ours / "index.faiss").is_file()


def test_safetensors_release_rebuilds_the_model_without_pickle(checkpoints, tasks, tmp_path):
    from safetensors.torch import load_file

    from finetune.export.release import load_release

    printed = finetune("export", "--ckpt_path", checkpoints["segmentation"], "--format", "safetensors",
                       "--output", tmp_path / "release.safetensors", "--parity_images", "2")
    assert diffs(printed) == {"probabilities": 0.0}  # same weights, same code: bit-identical
    config = yaml.safe_load((tmp_path / "release.yaml").read_text())  # plain YAML, no Python tags
    assert config["task"] == "segmentation" and config["model"]["init_args"]["pretrained"] is False
    weights = load_file(str(tmp_path / "release.safetensors"))  # plain tensors, no pickle
    network = load_release(tmp_path / "release.safetensors", tmp_path / "release.yaml")
    original = tasks["segmentation"].net
    assert set(weights) == set(original.state_dict())
    for name, tensor in original.state_dict().items():
        assert torch.equal(network.state_dict()[name], tensor), name


def test_errors_are_one_line_naming_the_flag(checkpoints, tmp_path):
    cases = [
        (["export", "--ckpt_path", checkpoints["classification"], "--format", "tflite"], "--format"),
        (["export", "--ckpt_path", tmp_path / "missing.ckpt"], "--ckpt_path"),
        (["export", "--ckpt_path", checkpoints["classification"], "--images", tmp_path], "--images"),
        (["predict", "--exported", tmp_path / "missing.onnx", "--input", tmp_path], "--exported"),
    ]
    for args, flag in cases:
        with pytest.raises(SystemExit) as error:
            finetune(*args)
        message = str(error.value.code)
        assert flag in message and "\n" not in message, message


def test_float_input_when_normalisation_stays_outside(exported, checkpoints, data, tmp_path):
    from finetune.export.metadata import read_metadata

    path = tmp_path / "float.torchscript.pt"
    printed = finetune("export", "--ckpt_path", checkpoints["classification"], "--format", "torchscript",
                       "--output", path, "--normalize_in_graph", "false", "--parity_images", "4")
    assert diffs(printed)["probabilities"] <= TOLERANCE
    assert read_metadata(path)["input"]["normalized_in_graph"] is False
    float_model, uint8_model = ExportedModel(path), ExportedModel(exported("classification", "torchscript")[0])
    images = np.stack([uint8_model.preprocess(p) for p, _ in data["classification"].splits.val[:3]])
    got, expected = float_model.run(images)["probabilities"], uint8_model.run(images)["probabilities"]
    assert np.abs(got - expected).max() <= TOLERANCE


def test_parity_fails_above_the_tolerance_and_allows_ties():
    from finetune.export.parity import ParityReport

    probs = np.array([[0.7, 0.2, 0.1], [0.50002, 0.49998, 0.0]], dtype=np.float32)  # second: a tie
    reference = {"logits": np.array([[3.0, 1.0, -2.0], [20.0, 19.9, -5.0]], dtype=np.float32), "probabilities": probs}

    def check(probabilities, logits=reference["logits"]) -> ParityReport:
        report = ParityReport(TOLERANCE, "test")
        report.add(reference, {"logits": logits, "probabilities": probabilities})
        return report

    assert check(probs + 5e-5).ok
    assert check(probs, logits=reference["logits"] + 1.5e-3).ok  # logits: 1e-4 of the largest |logit|, 20
    assert not check(probs, logits=reference["logits"] + 3e-3).ok
    failed = check(probs + np.float32(2e-4))
    assert not failed.ok and "FAILED: probabilities differs by up to 2.0" in failed.summary()
    swapped_tie = probs.copy()
    swapped_tie[1, :2] = swapped_tie[1, 1::-1]
    tied = check(swapped_tie)
    assert tied.ok and tied.label_differences == 1, tied.summary()
    swapped = probs.copy()
    swapped[0, :2] = swapped[0, 1::-1]
    assert not check(swapped).ok
