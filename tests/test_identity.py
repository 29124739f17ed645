"""Identity data split by identity (open set), LFW pair numbering, and a short ArcFace training
that lifts held-out recall@1 above the same backbone untrained; FAISS search end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_colour_images

from finetune.data import IdentityFolderDataModule
from finetune.tasks import EmbeddingTask

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "data" / "faces-sample"


def test_split_is_by_identity_and_reports_single_images(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="finetune")
    write_colour_images(tmp_path, per_class=4, seed=0)  # 3 identities
    for name in ("cyan", "grey", "pink", "teal"):
        write_colour_images(tmp_path / "more", per_class=1 if name == "teal" else 3, seed=1)
        (tmp_path / "more" / "red").rename(tmp_path / name)
        for leftover in (tmp_path / "more").iterdir():
            for f in leftover.iterdir():
                f.unlink()
            leftover.rmdir()
    dm = IdentityFolderDataModule(str(tmp_path), backbone="resnet18", val_fraction=0.3, num_workers=0)
    train_ids = {Path(p).parent.name for p, _ in dm.splits.train}
    val_ids = {Path(p).parent.name for p, _ in dm.splits.val}
    assert not train_ids & val_ids and len(train_ids) + len(val_ids) == 7 and len(val_ids) == 2
    assert dm.num_classes == len(train_ids) and sorted(dm.val_identity_names) == sorted(val_ids)
    assert {label for _, label in dm.splits.val} == {0, 1}  # validation identities have their own indices
    if "teal" in train_ids:
        assert "1 training identities have a single image" in caplog.text


def test_lfw_numbering_of_validation_images():
    dm = IdentityFolderDataModule(str(FACES), backbone="resnet18", image_size=32, num_workers=0, pairs_file="val_pairs.txt")
    index_of = dm.val_index_of()
    name = dm.val_identity_names[0]
    first = sorted(p for p, label in dm.splits.val if label == 0)[0]
    assert dm.splits.val[index_of[(name, 1)]][0] == first
    assert dm.pairs_path == FACES / "val_pairs.txt"
    with pytest.raises(FileNotFoundError, match="data.pairs_file"):
        IdentityFolderDataModule(str(FACES), backbone="resnet18", num_workers=0, pairs_file="nope.txt")


def held_out_recall(task, dm) -> float:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.validate(task, dm, verbose=False)
    return trainer.callback_metrics["val/recall@1"].item()


def test_short_arcface_training_beats_the_untrained_backbone(identity_folder):
    L.seed_everything(0)
    dm = IdentityFolderDataModule(str(identity_folder), backbone="resnet18", image_size=32, hflip=0.0, batch_size=32,
                                  num_workers=0)
    task = EmbeddingTask(dm.num_classes, backbone="resnet18", pretrained=False, embedding_dim=64, logit_scale=16.0,
                         margin=0.2, optimizer="adamw", lr=2e-3, warmup_epochs=0.5)
    before = held_out_recall(task, dm)
    trainer = L.Trainer(accelerator="cpu", max_epochs=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    after = trainer.callback_metrics["val/recall@1"].item()
    assert after > before + 0.1, (before, after)  # on 15 identities never seen in training
    assert {"val/acc", "val/auc", "val/eer", "val/tar@far=1e-1", "val/map@r"} <= set(trainer.callback_metrics)


def test_predict_embeddings_then_search_finds_the_same_identity_first(tmp_path, capsys, monkeypatch):
    from finetune.cli import create_cli
    from finetune.commands import main

    common = [
        "--config", str(REPO / "configs" / "faces_quickstart.yaml"), "--data.image_size", "32",
        "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--model.pretrained", "false",
    ]
    fit = create_cli(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    assert "val/recall@1" in capsys.readouterr().out
    gallery = FACES / "train"
    for out in ("gallery", "queries"):
        create_cli(["predict", *common, "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path,
                    "--data.predict_root", str(gallery), "--predictions.output_dir", str(tmp_path / out)])
    embeddings = torch.from_numpy(__import__("numpy").load(tmp_path / "gallery" / "embeddings.npy"))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(embeddings)))
    monkeypatch.setattr(sys, "argv", ["finetune", "search", "--gallery", str(tmp_path / "gallery"),
                                      "--queries", str(tmp_path / "queries"), "--k", "3",
                                      "--output", str(tmp_path / "matches.csv")])
    main()
    import csv

    rows = list(csv.DictReader((tmp_path / "matches.csv").open()))
    first = [r for r in rows if r["rank"] == "1"]
    assert len(first) == len(embeddings)
    assert all(r["match"] == r["query"] and Path(r["query"]).parent.name == r["identity"] for r in first)
