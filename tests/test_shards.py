"""Training from `finetune prepare` shards (finetune.data.ShardDataModule): the same batches as
the folder, exact mid-epoch resume, 2 DDP processes seeing each sample once an epoch, and bad
shards named in one line."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.data import ImageFolderDataModule, ShardDataModule
from finetune.errors import FinetuneError
from finetune.prepare import write_shards
from finetune.tasks import ClassificationTask

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
DATA = dict(backbone="resnet18", image_size=32, batch_size=16, num_workers=0)


@pytest.fixture(scope="module")
def shards(colour_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "colours"
    write_shards(ImageFolderDataModule(str(colour_folder), **DATA), out, num_workers=1, chunk_bytes="8KB", echo=lambda _: None)
    return out


def test_shards_give_the_folder_batches_bit_for_bit(colour_folder, shards):
    """Same order, same crops and flips: the sampler and the (seed, epoch, index) augmentation are
    the folder's, and a JPEG or PNG decodes from its stored bytes as from its file."""
    folder, sharded = ImageFolderDataModule(str(colour_folder), **DATA), ShardDataModule(str(shards), **DATA)
    assert sharded.class_names == folder.class_names and len(sharded.splits.train) == len(folder.splits.train)
    for make in ("train_dataloader", "val_dataloader"):
        for a, b in zip(getattr(folder, make)(), getattr(sharded, make)()):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and a["path"] == b["path"]


class SeenIndices(Callback):
    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += batch["index"].tolist()

    def on_train_epoch_end(self, trainer, pl_module):
        torch.save(torch.tensor(self.seen), f"{self.path}.rank{trainer.global_rank}.epoch{trainer.current_epoch}")
        self.seen = []


def test_two_ddp_processes_see_every_sample_once_an_epoch(shards, tmp_path):
    """48 training samples, 2 ranks x batch 8: 3 steps an epoch, each sample on one rank, once."""
    dm = ShardDataModule(str(shards), **{**DATA, "batch_size": 8})
    task = ClassificationTask(3, "resnet18", pretrained=False)
    trainer = L.Trainer(max_epochs=2, devices=2, strategy="ddp_spawn", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[SeenIndices(tmp_path / "seen")], default_root_dir=tmp_path, **QUIET)
    trainer.fit(task, dm)
    orders = []
    for epoch in (0, 1):
        ranks = [torch.load(tmp_path / f"seen.rank{rank}.epoch{epoch}").tolist() for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 24
        assert sorted(ranks[0] + ranks[1]) == list(range(48))
        orders.append(ranks[0])
    assert orders[0] != orders[1]  # a new order each epoch


def test_resumed_mid_epoch_ends_with_the_uninterrupted_weights(shards, tmp_path):
    def fit(ckpt_path=None):
        L.seed_everything(0)
        dm = ShardDataModule(str(shards), **DATA)
        task = ClassificationTask(3, "resnet18", pretrained=False)
        saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)
        trainer = L.Trainer(max_epochs=2, callbacks=[saver], limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
        trainer.fit(task, dm, ckpt_path=ckpt_path)
        return torch.load(tmp_path / "epoch=1-step=6.ckpt", weights_only=True)["state_dict"]

    uninterrupted = fit()
    resumed = fit(ckpt_path=tmp_path / "epoch=0-step=2.ckpt")  # two of the epoch's three steps done
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


def test_other_shards_refuse_a_checkpoint_of_another_dataset(shards, tmp_path):
    dm = ShardDataModule(str(shards), **DATA)
    state = dm.state_dict()
    assert state["dataset_id"] == json.loads((shards / "finetune_shards.json").read_text())["dataset_id"]
    with pytest.raises(FinetuneError, match="holds other data"):
        dm.load_state_dict({**state, "dataset_id": "0" * 64})


def test_truncated_chunk_missing_index_and_missing_metadata_are_one_line(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    chunk = sorted((broken / "train").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(FinetuneError, match=rf"{chunk.name} is truncated or changed \(100 bytes"):
        ShardDataModule(str(broken), **DATA)
    (broken / "train" / "index.json").unlink()
    with pytest.raises(FinetuneError, match="index.json is missing"):
        ShardDataModule(str(broken), **DATA)
    with pytest.raises(FinetuneError, match="finetune prepare"):
        ShardDataModule(str(tmp_path / "nothing"), **DATA)


def test_multi_label_manifest_shards_give_the_manifest_batches(tmp_path):
    from test_multilabel import write_colour_sets

    from finetune.data import ManifestDataModule

    rows = [r for r in write_colour_sets(tmp_path, 24, "train", seed=0) + write_colour_sets(tmp_path, 8, "val", seed=1) if r[1]]
    (tmp_path / "labels.csv").write_text("path,labels,split\n" + "".join(",".join(r) + "\n" for r in rows))
    manifest = ManifestDataModule(str(tmp_path / "labels.csv"), **DATA)
    write_shards(manifest, tmp_path / "shards", num_workers=1, echo=lambda _: None)
    sharded = ShardDataModule(str(tmp_path / "shards"), **DATA)
    assert sharded.multilabel and sharded.class_names == manifest.class_names
    assert sharded.label_counts == manifest.label_counts
    for a, b in zip(manifest.train_dataloader(), sharded.train_dataloader()):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["label"].dim() == 2


def test_jpeg_shards_decode_only_the_crop_as_the_folder_does(tmp_path):
    """JPEGs take the crop-first path (libturbojpeg decodes the crop from the stored bytes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for name in ("cat", "dog"):
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "photos" / split / name / f"{i}.jpg", quality=90)
    folder = ImageFolderDataModule(str(tmp_path / "photos"), **DATA)
    write_shards(folder, tmp_path / "shards", num_workers=1, echo=lambda _: None)
    sharded = ShardDataModule(str(tmp_path / "shards"), **DATA)
    assert sharded.dataset(sharded.splits.train, train=True).crop_first is not None
    for a, b in zip(folder.train_dataloader(), sharded.train_dataloader()):
        assert torch.equal(a["image"], b["image"]) and not b["skipped"][0]


def test_segmentation_shards_give_the_folder_batches_and_train(shapes_folder, tmp_path):
    from finetune.data import SegmentationFolderDataModule, ShardSegmentationDataModule
    from finetune.tasks import SegmentationTask

    settings = dict(backbone="resnet18", crop_size=32, batch_size=4, num_workers=0)
    folder = SegmentationFolderDataModule(str(shapes_folder), **settings)
    write_shards(folder, tmp_path / "shards", num_workers=1, echo=lambda _: None)
    sharded = ShardSegmentationDataModule(str(tmp_path / "shards"), **settings)
    assert sharded.class_names == folder.class_names
    for make in ("train_dataloader", "val_dataloader"):
        for a, b in zip(getattr(folder, make)(), getattr(sharded, make)()):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    task = SegmentationTask(3, "resnet18", pretrained=False, class_names=sharded.class_names, aspp_channels=16)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path, **QUIET)
    trainer.fit(task, sharded)
    assert trainer.global_step == 2 and "val/miou" in trainer.callback_metrics
    with pytest.raises(FinetuneError, match="use finetune.data.ShardSegmentationDataModule"):
        ShardDataModule(str(tmp_path / "shards"), **DATA)
