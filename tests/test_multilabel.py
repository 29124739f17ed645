"""Multi-label classification: metrics against hand-computed values, a short training far above
the label-frequency baseline, thresholds tuned and kept, predictions from a checkpoint and from an
ONNX export writing the same label sets."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.data import ManifestDataModule
from finetune.errors import FinetuneError
from finetune.metrics.multilabel import MultiLabelMetrics
from finetune.models import MultiLabelClassifier
from finetune.tasks import ClassificationTask, MultiLabelClassificationTask
from finetune.tasks.mixing import BatchMixing
from finetune.tasks.multilabel import negatives_per_positive
from finetune.writers import label_set_rows

COLOURS = {"red": (210, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 210)}
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def write_colour_sets(root: Path, count: int, split: str, seed: int, size: int = 32) -> list[list[str]]:
    """Grey noise with a square of each of 0-3 colours in its own quadrant; the labels are the colours."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, half = [], size // 2
    for i in range(count):
        image = rng.normal(128, 25, (size, size, 3))
        present = [name for name in COLOURS if rng.random() < 0.35]
        for quadrant, name in zip(rng.permutation(4), present):
            top, left = divmod(int(quadrant), 2)
            image[top * half:(top + 1) * half, left * half:(left + 1) * half] = COLOURS[name] + rng.normal(0, 15, (half, half, 3))
        path = f"images/{split}_{i:03d}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / path)
        rows.append([path, ";".join(present), split])
    return rows


@pytest.fixture(scope="module")
def colour_sets(tmp_path_factory) -> Path:
    """labels.csv (path,labels,split) over 64 train and 24 val images; some images have no label."""
    root = tmp_path_factory.mktemp("colour_sets")
    rows = write_colour_sets(root, 64, "train", seed=0) + write_colour_sets(root, 24, "val", seed=1)
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        # A row without labels is a bad row in a label column; one-hot columns express "none".
        writer.writerows(row for row in rows if row[1])
    return root / "labels.csv"


def datamodule(manifest: Path, **kwargs) -> ManifestDataModule:
    return ManifestDataModule(str(manifest), backbone="resnet18", image_size=32, crop="whole", batch_size=16,
                              num_workers=0, **kwargs)


@pytest.fixture(scope="module")
def trained(colour_sets, tmp_path_factory):
    """(task, datamodule, checkpoint, trainer) after a short run that tunes thresholds."""
    root = tmp_path_factory.mktemp("multilabel_run")
    L.seed_everything(0)
    dm = datamodule(colour_sets)
    task = MultiLabelClassificationTask(dm.num_classes, "resnet18", pretrained=False, class_names=dm.class_names,
                                        lr=3e-3, tune_thresholds=True, pos_weight="auto")
    trainer = L.Trainer(max_epochs=10, default_root_dir=root, enable_checkpointing=False, **QUIET)
    trainer.fit(task, dm)
    checkpoint = root / "multilabel.ckpt"
    trainer.save_checkpoint(checkpoint)
    return task, dm, checkpoint, trainer


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_match_hand_computed_values():
    metrics = MultiLabelMetrics(3)
    probabilities = torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.7, 0.2], [0.3, 0.4, 0.3], [0.8, 0.1, 0.2]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]])  # label 2 has no positive
    metrics.update(torch.logit(probabilities), targets)
    values = metrics.compute()
    # AP of label 0: ranked 0.9+, 0.8+, 0.6-, 0.3+ -> precisions at hits 1, 1, 3/4 -> (1 + 1 + 0.75) / 3.
    # Label 1: 0.7+, 0.4+, 0.2-, 0.1- -> 1. Label 2 has no positive: left out of the macro mean.
    ap0 = (1 + 1 + 0.75) / 3
    torch.testing.assert_close(values["ap"][:2], torch.tensor([ap0, 1.0]))
    torch.testing.assert_close(values["map"], torch.tensor((ap0 + 1.0) / 2))
    # At 0.5: label 0 predicts rows 0, 1, 3 (tp 2, fp 1, fn 1) -> F1 2/3; label 1 predicts row 1
    # (tp 1, fn 1) -> F1 2/3; label 2 predicts nothing. Micro: tp 3, fp 1, fn 2 -> 6 / 9.
    torch.testing.assert_close(values["f1_class"][:2], torch.tensor([2 / 3, 2 / 3]))
    torch.testing.assert_close(values["f1"], torch.tensor(2 / 3))
    torch.testing.assert_close(values["f1_micro"], torch.tensor(6 / 9))
    # Exact match: rows 0 and 3 are right on all three labels.
    torch.testing.assert_close(values["exact_match"], torch.tensor(0.5))
    assert values["positives"].tolist() == [3, 2, 0]


def test_per_label_thresholds_decide_each_label_and_are_tuned_for_f1():
    metrics = MultiLabelMetrics(2, tune=True)
    probabilities = torch.tensor([[0.30, 0.9], [0.25, 0.2], [0.10, 0.8], [0.05, 0.1]])
    targets = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]])
    metrics.update(torch.logit(probabilities), targets)
    thresholds, best_f1 = metrics.best_thresholds()
    # Label 0 separates anywhere in (0.10, 0.25]; label 1 in (0.2, 0.8]: the middle of each tied run.
    assert 0.10 < thresholds[0] <= 0.25 and 0.2 < thresholds[1] <= 0.8
    assert abs(thresholds[0] - 0.18) < 0.011 and abs(thresholds[1] - 0.5) < 0.011
    torch.testing.assert_close(best_f1, torch.ones(2))
    assert metrics.compute()["f1_class"][0] == 0  # at 0.5 label 0 predicts nothing
    metrics.reset()
    metrics.thresholds.copy_(thresholds)
    metrics.update(torch.logit(probabilities), targets)
    torch.testing.assert_close(metrics.compute()["f1_class"], torch.ones(2))


def test_pos_weight_auto_is_negatives_per_positive():
    assert negatives_per_positive([10, 25, 0], 100) == [9.0, 3.0, 1.0]


def test_label_set_rows_list_labels_at_or_above_their_thresholds():
    probs = np.array([[0.7, 0.2, 0.4], [0.1, 0.1, 0.1]], dtype=np.float32)
    rows = label_set_rows(["a.png", "b.png"], probs, ["cat", "dog", "hat"], [0.5, 0.5, 0.4])
    assert rows[0] == ["a.png", "cat;hat", "cat:0.7000;dog:0.2000;hat:0.4000"]
    assert rows[1][1] == ""


def test_mixup_mixes_multi_hot_targets_as_they_are():
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    images = torch.randn(2, 3, 8, 8)
    mixed_images, mixed = BatchMixing(3, 0.8, 0.0, prob=1.0, switch_prob=0.5, label_smoothing=0.0)(images, targets, step=3)
    lam = mixed[0, 0].item()  # row 0 = lam * row 0 + (1 - lam) * row 1 (roll by one)
    torch.testing.assert_close(mixed, lam * targets + (1 - lam) * targets.roll(1, 0))
    torch.testing.assert_close(mixed_images, lam * images + (1 - lam) * images.roll(1, 0))


def test_sigmoid_network_averages_probabilities_over_test_time_views():
    torch.manual_seed(0)
    plain = MultiLabelClassifier("resnet18", 4).eval()
    flipped = MultiLabelClassifier("resnet18", 4, tta_flip=True).eval()
    flipped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mean = (plain(x).sigmoid() + plain(x.flip(-1)).sigmoid()) / 2
        torch.testing.assert_close(flipped.predict(x)["probabilities"], mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(plain.predict(x)["probabilities"], plain(x).sigmoid())


# -- data ---------------------------------------------------------------------------------------

def test_manifest_datamodule_gives_multi_hot_labels_and_counts(colour_sets):
    dm = datamodule(colour_sets)
    assert dm.multilabel and dm.class_names == ["blue", "green", "red"]
    assert len(dm.splits.train) + len(dm.splits.val) == sum(1 for _ in open(colour_sets)) - 1
    batch = next(iter(dm.val_dataloader()))
    first_path, first_labels = dm.splits.val[0]
    expected = torch.zeros(3)
    expected[list(first_labels)] = 1.0
    torch.testing.assert_close(batch["label"][0], expected)
    assert dm.label_counts == [sum(label in labels for _, labels in dm.splits.train) for label in range(3)]
    assert dm.report.counts["train"] == dict(zip(dm.class_names, dm.label_counts))


def test_single_label_task_refuses_multi_label_data_in_one_line(colour_sets, tmp_path):
    dm = datamodule(colour_sets)
    task = ClassificationTask(3, "resnet18", pretrained=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    with pytest.raises(FinetuneError, match="use finetune.tasks.MultiLabelClassificationTask"):
        trainer.fit(task, dm)


# -- training, thresholds, prediction, export ---------------------------------------------------

def test_short_training_beats_the_label_frequency_baseline_by_far(trained):
    task, dm, _, trainer = trained
    val = torch.stack([torch.zeros(3).index_fill_(0, torch.tensor(labels, dtype=torch.long), 1.0)
                       for _, labels in dm.splits.val])
    baseline = val.mean(dim=0).mean().item()  # macro mAP of constant scores = mean prevalence
    assert baseline < 0.55
    assert trainer.callback_metrics["val/map"] > baseline + 0.3
    torch.testing.assert_close(task.loss_pos_weight, torch.tensor(negatives_per_positive(dm.label_counts, len(dm.splits.train))))


def test_tuned_thresholds_are_saved_in_the_checkpoint_and_restored(trained):
    task, _, checkpoint, _ = trained
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")["hyper_parameters"]["threshold"]
    assert saved == task.decision_thresholds and len(saved) == 3 and saved != [0.5, 0.5, 0.5]
    restored = MultiLabelClassificationTask.load_from_checkpoint(checkpoint, map_location="cpu")
    assert restored.decision_thresholds == saved
    torch.testing.assert_close(restored.val_metrics.thresholds, torch.tensor(saved))


def test_asl_loss_and_loss_options():
    task = MultiLabelClassificationTask(3, "resnet18", pretrained=False, loss="asl")
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert task._loss(logits, targets) > 0
    plain = MultiLabelClassificationTask(3, "resnet18", pretrained=False, label_smoothing=0.2)
    torch.testing.assert_close(plain._loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1))
    with pytest.raises(ValueError, match="model.threshold"):
        MultiLabelClassificationTask(3, "resnet18", pretrained=False, threshold=[0.5, 0.5])
    with pytest.raises(ValueError, match="model.pos_weight: 2 weights for 3 labels"):
        MultiLabelClassificationTask(3, "resnet18", pretrained=False, pos_weight=[1.0, 2.0])


def test_predict_from_checkpoint_and_from_onnx_write_the_same_label_sets(trained, tmp_path):
    from finetune.callbacks import PredictionWriter
    from finetune.export.metadata import read_metadata
    from finetune.predict_exported import main as predict_exported
    from tests.test_export import finetune

    task, dm, checkpoint, _ = trained
    folder = tmp_path / "inputs"
    folder.mkdir()
    for path, _ in dm.splits.val[:10]:
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    dm.hparams.predict_root = str(folder)
    trainer = L.Trainer(callbacks=[PredictionWriter(str(tmp_path / "ckpt"))], default_root_dir=tmp_path, **QUIET)
    trainer.predict(task.eval(), dm, return_predictions=False)

    onnx = tmp_path / "multilabel.onnx"
    printed = finetune("export", "--ckpt_path", checkpoint, "--format", "onnx", "--output", onnx, "--parity_images", "8")
    assert "FAILED" not in printed
    meta = read_metadata(onnx)
    assert meta["task"] == "multilabel_classification" and meta["thresholds"] == task.decision_thresholds
    predict_exported(["--exported", str(onnx), "--input", str(folder), "--output", str(tmp_path / "onnx")])

    ours = list(csv.DictReader((tmp_path / "onnx" / "predictions.csv").open()))
    theirs = list(csv.DictReader((tmp_path / "ckpt" / "predictions.csv").open()))
    assert list(ours[0]) == ["path", "labels", "probabilities"] and len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs):
        assert (Path(a["path"]).name, a["labels"]) == (Path(b["path"]).name, b["labels"])
        pa = [float(x.split(":")[1]) for x in a["probabilities"].split(";")]
        pb = [float(x.split(":")[1]) for x in b["probabilities"].split(";")]
        assert np.abs(np.array(pa) - np.array(pb)).max() <= 1e-4 + 1e-9
    # The labels listed are exactly those at or above their thresholds.
    for row in theirs:
        probs = dict(x.split(":") for x in row["probabilities"].split(";"))
        above = [name for name, t in zip(task.class_names, task.decision_thresholds) if float(probs[name]) >= t]
        assert row["labels"] == ";".join(above)


# -- a Hugging Face dataset through the CLI ------------------------------------------------------

def test_hf_dataset_saved_to_disk_trains_through_the_cli_logs_wandb_and_predicts(colour_sets, tmp_path, monkeypatch, capsys):
    """The quickstart's config with `data.hf_dataset` pointing at a `save_to_disk` folder: fit
    (offline W&B with the per-label table), then predict from the best checkpoint, whose tuned
    thresholds the CLI restores."""
    import datasets

    from finetune.cli import create_cli

    rows = list(csv.DictReader(colour_sets.open()))
    names = ["blue", "green", "red"]
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(datasets.ClassLabel(names=names))})

    def split(name: str) -> datasets.Dataset:
        kept = [r for r in rows if r["split"] == name]
        return datasets.Dataset.from_dict(
            {"image": [str(colour_sets.parent / r["path"]) for r in kept],
             "labels": [[names.index(n) for n in r["labels"].split(";")] for r in kept]},
            features=features,
        )

    saved = tmp_path / "hf_colours"
    datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(str(saved))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    config = str(Path(__file__).resolve().parents[1] / "configs" / "multilabel_quickstart.yaml")
    run = tmp_path / "run"
    common = [
        "--config", config, "--data.manifest", "null", "--data.hf_dataset", str(saved), "--data.label_column", "labels",
        "--data.image_size", "32", "--data.batch_size", "16", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--model.pretrained", "false",
    ]
    cli = create_cli(["fit", *common, "--trainer.max_epochs", "6", "--model.lr", "0.003"])
    assert "val/map" in capsys.readouterr().out
    assert cli.datamodule.class_names == names and len(cli.datamodule.splits.val) == sum(r["split"] == "val" for r in rows)
    assert cli.trainer.callback_metrics["val/map"] > 0.7
    tables = list((run / "wandb").glob("offline-run-*/files/media/table/val/per_label*.json"))
    assert tables, "the per-label table was not logged"

    best = cli.trainer.checkpoint_callback.best_model_path
    thresholds = torch.load(best, weights_only=True, map_location="cpu")["hyper_parameters"]["threshold"]
    predicted = create_cli([
        "predict", *common, "--trainer.logger", "false", "--ckpt_path", best,
        "--data.predict_root", str(colour_sets.parent / "images"), "--predictions.output_dir", str(tmp_path / "out"),
    ])
    assert predicted.model.decision_thresholds == thresholds
    out = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    images = len(list((colour_sets.parent / "images").glob("*.png")))  # the unlabelled ones too
    assert len(out) == images and list(out[0]) == ["path", "labels", "probabilities"]
