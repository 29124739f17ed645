"""RunReport: the run's figures, metrics.csv and index.html with no logger at all; W&B picture
callbacks that say where the pictures went; our metrics in a non-W&B Lightning logger."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

from finetune.callbacks import WandbEmbeddingLogger, WandbMaskLogger, WandbMediaLogger
from finetune.callbacks.report import RunReport
from finetune.cli import create_cli
from finetune.data import IdentityFolderDataModule, ImageFolderDataModule, SegmentationFolderDataModule
from finetune.report import figures
from finetune.report.figures import overlay
from finetune.report.history import MetricHistory, scalar_metrics
from finetune.report.task_figures import genuine_impostor_scores, plan_figures
from finetune.tasks import ClassificationTask, EmbeddingTask, SegmentationTask

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSIFICATION_FIGURES = ["loss.png", "metrics.png", "confusion_matrix.png"]


def assert_pictures(folder: Path, names: list[str]) -> None:
    index = (folder / "index.html").read_text()
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 2000, name
        assert f'src="{name}"' in index, name


def report_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "metrics.csv").open()))


def trainer(run: Path, callbacks: list, epochs: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks, default_root_dir=run,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     **{"logger": False, **kwargs})


def classification(colour_folder) -> tuple[ClassificationTask, ImageFolderDataModule]:
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    return ClassificationTask(3, backbone="resnet18", pretrained=False, class_names=dm.class_names, lr=3e-3), dm


def media_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "finetune.callbacks.media"]


# -- whole runs -------------------------------------------------------------------------------


def test_cli_fit_without_logger_writes_the_report_and_a_resumed_fit_continues_it(colour_folder, tmp_path, caplog):
    run = tmp_path / "run"
    base = [
        "--config", str(REPO / "configs" / "quickstart.yaml"),  # it has WandbMediaLogger
        "--data.root", str(colour_folder), "--data.image_size", "32", "--data.batch_size", "16",
        "--data.num_workers", "0", "--model.pretrained", "false", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
        # no callback to add: the CLI always has the report (`report.*`)
    ]
    cli = create_cli(["fit", *base, "--trainer.max_epochs", "2"])
    report = run / "report"
    assert_pictures(report, CLASSIFICATION_FIGURES)
    rows = report_rows(report)
    val_rows = [r for r in rows if r["val/acc"]]
    train_rows = [r for r in rows if r["train/loss_epoch"]]
    assert [r["epoch"] for r in val_rows] == ["0", "1"] and [r["epoch"] for r in train_rows] == ["0", "1"]
    assert [r["step"] for r in val_rows] == ["3", "6"]  # 48 images in batches of 16
    final = cli.trainer.callback_metrics
    assert float(val_rows[-1]["val/acc"]) == pytest.approx(float(final["val/acc"]))
    assert float(train_rows[-1]["train/loss_epoch"]) == pytest.approx(float(final["train/loss_epoch"]))
    index = (report / "index.html").read_text()
    assert '<a href="metrics.csv">' in index and "<td>val/acc</td>" in index
    # Learn from the run: every validation image once, highest loss first, as `finetune interpret` writes it.
    samples = list(csv.DictReader((report / "interpret-val.csv").open()))
    assert len(samples) == 24 and sorted({r["true"] for r in samples}) == ["blue", "green", "red"]
    losses = [float(r["loss"]) for r in samples]
    assert losses == sorted(losses, reverse=True)
    accuracy = sum(r["true"] == r["predicted"] for r in samples) / len(samples)
    assert accuracy == pytest.approx(float(final["val/acc"]), abs=1e-6)  # the same network, the same images
    assert_pictures(report, ["top_losses-val.png"])
    assert "Learn from the run" in index and 'href="interpret-val.csv"' in index
    notes = media_notes(caplog)
    assert notes == [f"WandbMediaLogger: no logger is configured (trainer.logger: false); the pictures are in {report}/ "
                     "(RunReport)"]

    resumed = create_cli([*base, "--trainer.max_epochs", "3"], run=False)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path="last")
    again = report_rows(report)
    assert [r["epoch"] for r in again if r["val/acc"]] == ["0", "1", "2"]
    assert [r["epoch"] for r in again if r["train/loss_epoch"]] == ["0", "1", "2"]
    assert again[:4] == rows  # the first run's rows, unchanged, then the new epoch's


def test_csv_logger_gets_our_metrics_and_wandb_picture_callbacks_say_where_pictures_are(colour_folder, tmp_path, caplog):
    task, dm = classification(colour_folder)
    wandb_callbacks = [WandbMediaLogger(), WandbMaskLogger(), WandbEmbeddingLogger()]
    fit = trainer(tmp_path, [*wandb_callbacks, RunReport()], epochs=2, logger=CSVLogger(tmp_path / "logs"))
    fit.fit(task, dm)

    logged = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    val_acc = [float(r["val/acc"]) for r in logged if r["val/acc"]]
    train_loss = [float(r["train/loss_epoch"]) for r in logged if r["train/loss_epoch"]]
    ours = report_rows(tmp_path / "report")
    assert val_acc == pytest.approx([float(r["val/acc"]) for r in ours if r["val/acc"]]) and len(val_acc) == 2
    assert train_loss == pytest.approx([float(r["train/loss_epoch"]) for r in ours if r["train/loss_epoch"]])
    assert len(train_loss) == 2
    where = f"CSVLogger cannot take W&B images; the pictures are in {tmp_path / 'report'}/ (RunReport)"
    assert media_notes(caplog) == [f"{type(cb).__name__}: {where}" for cb in wandb_callbacks]  # once each


def test_segmentation_report_after_fit_and_after_validate(shapes_folder, tmp_path):
    L.seed_everything(0)
    dm = SegmentationFolderDataModule(str(shapes_folder), backbone="resnet18", crop_size=48, batch_size=8,
                                      num_workers=0, pad_multiple=16)
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, class_names=dm.class_names, optimizer="adamw",
                            lr=3e-3)
    run = trainer(tmp_path, [RunReport(num_images=3)], limit_train_batches=2)
    run.fit(task, dm)
    assert_pictures(tmp_path / "report", ["loss.png", "metrics.png", "iou.png", "masks.png"])
    assert not (tmp_path / "report" / "confusion_matrix.png").exists()
    run.validate(task, dm)
    assert_pictures(tmp_path / "report" / "validate", ["iou.png", "masks.png"])
    assert "<td>val/miou</td>" in (tmp_path / "report" / "validate" / "index.html").read_text()


def test_embedding_report_has_roc_and_similarity_histogram(identity_folder, tmp_path):
    L.seed_everything(0)
    dm = IdentityFolderDataModule(str(identity_folder), backbone="resnet18", image_size=32, batch_size=64,
                                  num_workers=0)
    task = EmbeddingTask(dm.num_classes, backbone="resnet18", pretrained=False, embedding_dim=32, logit_scale=16.0,
                         margin=0.2, optimizer="adamw", lr=2e-3)
    trainer(tmp_path, [RunReport()]).fit(task, dm)
    assert_pictures(tmp_path / "report", ["loss.png", "metrics.png", "roc.png", "similarity.png"])


def test_a_figure_that_fails_is_left_out_with_one_line_and_the_run_goes_on(colour_folder, tmp_path, monkeypatch,
                                                                            caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(figures, "plot_confusion_matrix", broken)
    stale = tmp_path / "report" / "confusion_matrix.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an older run's")
    task, dm = classification(colour_folder)
    run = trainer(tmp_path, [RunReport()])
    run.fit(task, dm)
    assert run.state.finished and run.current_epoch == 1
    assert_pictures(tmp_path / "report", ["loss.png", "metrics.png"])
    assert not stale.exists() and "confusion_matrix.png" not in (tmp_path / "report" / "index.html").read_text()
    failures = [r.getMessage() for r in caplog.records if r.name == "finetune.callbacks.report"]
    assert failures == ["report: confusion_matrix.png not drawn (RuntimeError: boom)"]


# -- parts ------------------------------------------------------------------------------------


def test_history_series_latest_csv_and_checkpoint_state(tmp_path):
    history = MetricHistory()
    history.add(0, 3, {"val/acc": 0.5, "val/loss": 1.25})
    history.add(0, 3, {"train/loss_epoch": 2.0})
    history.add(1, 6, {"val/acc": 0.75, "val/loss": 0.5})
    history.add(1, 6, {})  # nothing logged: no row
    assert history.series("val/acc") == ([0, 1], [0.5, 0.75])
    assert history.latest() == {"val/acc": 0.75, "val/loss": 0.5, "train/loss_epoch": 2.0}
    history.write_csv(tmp_path / "metrics.csv")
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss_epoch,val/acc,val/loss", "0,3,,0.5,1.25", "0,3,2.0,,", "1,6,,0.75,0.5",
    ]
    report = RunReport()
    report.history = history
    restored = RunReport()
    restored.load_state_dict(report.state_dict())
    assert restored.history.rows == history.rows


def test_scalar_metrics_keep_one_number_values_under_the_prefix():
    metrics = {"val/acc": torch.tensor(0.5), "val/n": 3, "train/loss_step": torch.tensor(9.0),
               "train/loss_epoch": torch.tensor(1.5), "val/vector": torch.ones(2), "other": 1.0}
    assert scalar_metrics(metrics, "val/") == {"val/acc": 0.5, "val/n": 3.0}
    assert scalar_metrics(metrics, "train/") == {"train/loss_epoch": 1.5}


def test_overlay_blends_class_colours_and_keeps_ignored_pixels():
    picture = np.full((1, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 255]])
    blended = overlay(picture, mask, [(0, 0, 0), (200, 100, 0)], ignore_index=255)
    assert blended.tolist() == [[[50, 50, 50], [150, 100, 50], [100, 100, 100]]]


def test_genuine_and_impostor_similarities_by_hand():
    s = 0.5 ** 0.5
    embeddings = torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])
    genuine, impostor = genuine_impostor_scores(embeddings, torch.tensor([7, 7, 8]))
    assert genuine.tolist() == pytest.approx([s])  # (0, 1)
    assert impostor.tolist() == pytest.approx([0.0, s])  # (0, 2), (1, 2)
    genuine, impostor = genuine_impostor_scores(embeddings, torch.tensor([7, 7, 8]), max_items=2)  # items 0 and 2
    assert genuine.size == 0 and impostor.tolist() == pytest.approx([0.0])


def test_multilabel_gets_per_label_ap_bars_and_sections_join_the_index(tmp_path):
    module = SimpleNamespace(class_names=["cat", "dog", "sky"], per_label={
        "label": ["cat", "dog", "sky"], "ap": [0.9, float("nan"), 0.4], "f1": [0.8, 0.0, 0.3],
        "positives": [5, 0, 2], "threshold": [0.5, 0.5, 0.5],
    })
    assert [plan.filename for plan in plan_figures(MetricHistory(), module, None, {})] == ["per_label.png"]
    report = RunReport()
    report.add_section("Notes", "<p>first</p>")
    report.add_section("Notes", "<p>replaced</p>")

    def top_losses(folder: Path) -> str:
        (folder / "top_losses.csv").write_text("path,loss\n")
        return '<a href="top_losses.csv">top losses</a>'

    def broken(folder: Path) -> str:
        raise OSError("disk full")

    report.add_section("Interpretation", top_losses)
    report.add_section("Broken", broken)
    fake_trainer = SimpleNamespace(default_root_dir=tmp_path, state=SimpleNamespace(fn=TrainerFn.FITTING),
                                   callback_metrics={"val/map": torch.tensor(0.65)})
    index = report.write(fake_trainer, module)
    assert_pictures(tmp_path / "report", ["per_label.png"])
    page = index.read_text()
    assert page.count("<h2>Notes</h2>") == 1 and "<p>replaced</p>" in page and "first" not in page
    assert '<a href="top_losses.csv">' in page and (tmp_path / "report" / "top_losses.csv").is_file()
    assert "<h2>Broken</h2>" in page and "could not be written" in page
    assert '<td>val/map</td><td class="value">0.65</td>' in page
    assert not (tmp_path / "report" / "metrics.csv").exists()  # no history, no empty file


def test_disabled_report_writes_nothing(colour_folder, tmp_path, caplog):
    task, dm = classification(colour_folder)
    trainer(tmp_path, [RunReport(enabled=False), WandbMediaLogger()], limit_train_batches=1,
            limit_val_batches=1).fit(task, dm)
    assert not (tmp_path / "report").exists()
    assert media_notes(caplog) == [
        "WandbMediaLogger: no logger is configured (trainer.logger: false); turn the run report on "
        "(--report.enabled true) to get them as PNG files"
    ]


@pytest.fixture(autouse=True)
def _warnings_captured(caplog):
    caplog.set_level(logging.WARNING)
