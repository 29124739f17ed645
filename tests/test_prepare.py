"""`finetune prepare`: each kind of data as LitData shards, read back sample by sample against
the source files, and the metadata, restart safety and skipped files around them."""

from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import corrupt_png
from conftest import write_colour_images
from litdata import StreamingDataset

from finetune import prepare
from finetune.data import (
    IdentityFolderDataModule,
    ImageFolderDataModule,
    ManifestDataModule,
    SegmentationFolderDataModule,
)
from finetune.data.bad_images import BadImageError
from finetune.data.shard_format import META_FILE, dataset_id, read_meta, read_small_file
from finetune.errors import FinetuneError

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["blue", "green", "red"]  # the colour folder's classes, sorted


def build(cls, **kwargs):
    return prepare.build_datamodule(cls, {"backbone": "resnet18", **kwargs})


def write(dm, out: Path, **kwargs) -> tuple[dict, list[str]]:
    lines: list[str] = []
    meta = prepare.write_shards(dm, out, **{"num_workers": 1, "echo": lines.append, **kwargs})
    return meta, lines


def read_back(out: Path, split: str) -> list[dict]:
    dataset = StreamingDataset(str(out / split))
    return [dataset[i] for i in range(len(dataset))]


def labels_file(out: Path) -> dict:
    return json.loads((out / "labels.json").read_text())


def test_a_classification_folder_through_the_command_keeps_every_file_and_label(colour_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    code = prepare.main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(colour_folder),
                         "--output", str(out), "--num_workers", "2", "--chunk_bytes", "4kB"])
    assert code == 0
    meta = read_meta(out)
    assert meta["kind"] == "classification" and meta["class_names"] == COLOURS and meta["val_names"] is None
    assert meta["splits"] == {"train": 48, "val": 24, "test": 0} and meta["skipped"] == 0
    assert meta["datamodule"] == "ImageFolderDataModule" and meta["source"] == str(colour_folder)
    assert sorted(p.name for p in out.iterdir()) == [META_FILE, "labels.json", "skipped_images.csv", "train", "val"]
    assert not out.with_name("shards.partial").exists()
    for split in ("train", "val"):
        samples = read_back(out, split)
        index = json.loads((out / split / "index.json").read_text())
        assert len(index["chunks"]) > 2  # 4 kB chunks from 2 workers: order kept across chunks and workers
        files = sorted((colour_folder / split).glob("*/*.png"))
        assert sorted(s["path"] for s in samples) == [str(f) for f in files]  # each file exactly once
        for sample in samples:
            path = Path(sample["path"])
            assert sample["image"] == path.read_bytes()
            assert sample["label"] == COLOURS.index(path.parent.name)
        assert labels_file(out)[split] == [s["label"] for s in samples]
    printed = capsys.readouterr().out
    assert "train: 48 samples, " in printed and f"-> {out / 'train'}" in printed and "skipped: 0 files" in printed


def test_samples_are_written_in_the_split_order_by_several_workers(colour_folder, tmp_path):
    dm = build(ImageFolderDataModule, root=str(colour_folder), image_size=16, val_fraction=0.2)
    method, on_interrupt = multiprocessing.get_start_method(allow_none=True), signal.getsignal(signal.SIGINT)
    meta, lines = write(dm, tmp_path / "out", num_workers=2, chunk_bytes="3kB")
    # LitData forces a start method on the whole process and takes over Ctrl+C: both are put back
    assert multiprocessing.get_start_method(allow_none=True) == method and signal.getsignal(signal.SIGINT) == on_interrupt
    assert [s["path"] for s in read_back(tmp_path / "out", "train")] == [p for p, _ in dm.splits.train]
    assert [s["path"] for s in read_back(tmp_path / "out", "val")] == [p for p, _ in dm.splits.val]
    assert [line.split(":")[0] for line in lines] == ["train", "val", "skipped"]


@pytest.fixture(scope="module")
def multilabel_manifest(tmp_path_factory) -> Path:
    """labels.csv over 12 colour images: label sets by position; 2 rows marked val."""
    root = tmp_path_factory.mktemp("multilabel")
    write_colour_images(root / "images", 4, seed=3, size=16)
    sets = ["red", "red;green", "green;blue", "blue", "red;green;blue"]
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        for i, image in enumerate(sorted((root / "images").glob("*/*.png"))):
            writer.writerow([image.relative_to(root).as_posix(), sets[i % len(sets)], "val" if i in (4, 7) else ""])
    return root / "labels.csv"


def test_a_multilabel_manifest_stores_multi_hot_uint8_labels(multilabel_manifest, tmp_path):
    dm = build(ManifestDataModule, manifest=str(multilabel_manifest), multilabel=True, image_size=16)
    meta, _ = write(dm, tmp_path / "out", num_workers=2)
    assert meta["kind"] == "multilabel" and meta["class_names"] == COLOURS
    assert meta["splits"] == {"train": 10, "val": 2, "test": 0}
    rows = {str((multilabel_manifest.parent / row["path"]).resolve()): row["labels"]
            for row in csv.DictReader(multilabel_manifest.open())}
    for split in ("train", "val"):
        samples = read_back(tmp_path / "out", split)
        assert len(samples) == meta["splits"][split]
        for sample in samples:
            expected = np.array([int(c in rows[sample["path"]].split(";")) for c in COLOURS], dtype=np.uint8)
            assert sample["label"].dtype == np.uint8 and sample["label"].tolist() == expected.tolist()
            assert sample["image"] == Path(sample["path"]).read_bytes()
        assert labels_file(tmp_path / "out")[split] == [np.flatnonzero(s["label"]).tolist() for s in samples]


def test_a_segmentation_folder_stores_image_and_mask_bytes(shapes_folder, tmp_path):
    dm = build(SegmentationFolderDataModule, root=str(shapes_folder))
    meta, _ = write(dm, tmp_path / "out")
    assert meta["kind"] == "segmentation" and meta["class_names"] == ["background", "red", "blue"]
    assert meta["splits"] == {"train": 24, "val": 8, "test": 0}
    assert not (tmp_path / "out" / "labels.json").exists()  # the masks are the labels
    for split in ("train", "val"):
        samples = read_back(tmp_path / "out", split)
        assert [s["path"] for s in samples] == [image for image, _ in getattr(dm.splits, split)]
        for sample in samples:
            image = Path(sample["path"])
            assert image.parent.name == "images" and sample["image"] == image.read_bytes()
            assert sample["mask"] == (image.parent.parent / "masks" / image.name).read_bytes()


def test_an_identity_folder_keeps_the_validation_identities_names(identity_folder, tmp_path):
    dm = build(IdentityFolderDataModule, root=str(identity_folder), image_size=32)
    meta, _ = write(dm, tmp_path / "out", num_workers=2)
    assert meta["kind"] == "identity" and meta["splits"] == {"train": 240, "val": 90, "test": 0}
    assert meta["class_names"] == [f"id{i:02d}" for i in range(40)]
    assert meta["val_names"] == [f"held{i:02d}" for i in range(15)]
    for split, names in (("train", meta["class_names"]), ("val", meta["val_names"])):
        samples = read_back(tmp_path / "out", split)
        assert len({s["path"] for s in samples}) == len(samples) == meta["splits"][split]
        assert all(names[s["label"]] == Path(s["path"]).parent.name for s in samples)
        assert all(s["image"] == Path(s["path"]).read_bytes() for s in samples[::15])


def test_dataset_id_is_stable_wherever_the_data_is_and_changes_with_a_class(colour_folder, tmp_path):
    copy = shutil.copytree(colour_folder, tmp_path / "copy")
    first, _ = write(build(ImageFolderDataModule, root=str(colour_folder), image_size=16), tmp_path / "a")
    again, _ = write(build(ImageFolderDataModule, root=str(copy), image_size=16), tmp_path / "b")
    assert first["dataset_id"] == again["dataset_id"] and len(first["dataset_id"]) == 64
    for split in ("train", "val"):
        shutil.copytree(copy / split / "red", copy / split / "orange")
    grown, _ = write(build(ImageFolderDataModule, root=str(copy), image_size=16), tmp_path / "c")
    assert grown["class_names"] == ["blue", "green", "orange", "red"] and grown["dataset_id"] != first["dataset_id"]
    # what the id is made of, by hand: kind, names, the sorted relative paths of each split
    paths = {s: sorted(f.relative_to(colour_folder).as_posix() for f in (colour_folder / s).glob("*/*.png"))
             for s in ("train", "val")}
    assert first["dataset_id"] == dataset_id("classification", COLOURS, None, paths)
    assert dataset_id("classification", COLOURS, None, {**paths, "test": []}) == first["dataset_id"]
    assert dataset_id("classification", COLOURS, [], paths) != first["dataset_id"]


def test_an_existing_output_is_refused_or_replaced_and_a_stale_partial_is_removed(colour_folder, tmp_path):
    dm = build(ImageFolderDataModule, root=str(colour_folder), image_size=16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("from before")
    with pytest.raises(FinetuneError, match=r"^--output: .*out already exists; pass --overwrite to replace it"):
        write(dm, out)
    stale = tmp_path / "out.partial"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "index.json").write_text("{}")  # LitData would refuse to write over it
    (stale / "junk.bin").write_bytes(b"x")
    meta, _ = write(dm, out, overwrite=True)
    assert not stale.exists() and not (tmp_path / "out.replaced").exists() and not (out / "old.txt").exists()
    assert read_meta(out)["splits"] == meta["splits"] == {"train": 48, "val": 24, "test": 0}
    assert len(read_back(out, "train")) == 48


def test_skipped_files_are_listed_whether_found_screening_or_writing(colour_folder, tmp_path):
    root = shutil.copytree(colour_folder, tmp_path / "data")
    corrupt_png(root / "train" / "red" / "corrupt.png")
    dm = build(ImageFolderDataModule, root=str(root), image_size=16)
    gone = Path(dm.splits.train[0][0])  # deleted between the screening and the writing
    gone.unlink()
    meta, lines = write(dm, tmp_path / "out")
    assert meta["splits"] == {"train": 47, "val": 24, "test": 0} and meta["skipped"] == 2
    rows = {Path(row["path"]).name: row for row in csv.DictReader((tmp_path / "out" / "skipped_images.csv").open())}
    assert set(rows) == {"corrupt.png", gone.name}
    assert rows["corrupt.png"]["found"] == "setup" and rows[gone.name]["found"] == "prepare"
    assert rows[gone.name]["reason"].startswith("unreadable when the shards were written: [Errno 2]")
    samples = read_back(tmp_path / "out", "train")
    assert str(gone) not in {s["path"] for s in samples} and len(samples) == 47
    assert labels_file(tmp_path / "out")["train"] == [s["label"] for s in samples]
    assert lines[-1] == f"skipped: 2 files, listed in {tmp_path / 'out' / 'skipped_images.csv'}"


def test_on_bad_image_raise_stops_in_one_line_at_screening_and_at_writing(colour_folder, tmp_path):
    root = shutil.copytree(colour_folder, tmp_path / "data")
    corrupt_png(root / "val" / "blue" / "corrupt.png")
    with pytest.raises(BadImageError) as screened:
        build(ImageFolderDataModule, root=str(root), image_size=16, on_bad_image="raise")
    assert "corrupt.png" in str(screened.value) and "\n" not in str(screened.value)
    (root / "val" / "blue" / "corrupt.png").unlink()
    dm = build(ImageFolderDataModule, root=str(root), image_size=16, on_bad_image="raise")
    Path(dm.splits.val[0][0]).unlink()
    with pytest.raises(BadImageError, match=r"unreadable when the shards were written") as written:
        write(dm, tmp_path / "out")
    assert "\n" not in str(written.value) and not (tmp_path / "out").exists()


def test_read_meta_refuses_in_one_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"has no finetune_shards.json; make shards with `finetune prepare`$"):
        read_meta(tmp_path)
    cases = {"{not json": "is not readable JSON", json.dumps({"format": "other"}): "is not finetune shards metadata",
             json.dumps({"format": "finetune-shards", "version": 2}): "is version 2 of the shard format"}
    for text, message in cases.items():
        (tmp_path / META_FILE).write_text(text)
        with pytest.raises(FinetuneError, match=message) as error:
            read_meta(tmp_path)
        assert "\n" not in str(error.value)


def test_read_meta_from_a_bucket_goes_through_litdatas_storage_client(colour_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(build(ImageFolderDataModule, root=str(colour_folder), image_size=16), out)
    fetched = []

    class Bucket:  # LitData's S3 client, standing in for the bucket the shards were copied to
        def download_file(self, remote: str, local: str) -> None:
            fetched.append(remote)
            shutil.copy(out / remote.removeprefix("s3://bucket/shards/"), local)

    import litdata.streaming.fs_provider as fs_provider

    monkeypatch.setattr(fs_provider, "_get_fs_provider", lambda url, options: Bucket())
    assert read_meta("s3://bucket/shards/") == read_meta(out)
    assert json.loads(read_small_file("s3://bucket/shards", "labels.json")) == labels_file(out)
    assert fetched == ["s3://bucket/shards/finetune_shards.json", "s3://bucket/shards/labels.json"]
    with pytest.raises(FinetuneError, match=r"^s3://bucket/shards/missing.json could not be read \("):
        read_small_file("s3://bucket/shards", "missing.json")


def test_bad_flags_are_one_line_errors(colour_folder, tmp_path):
    for size, expected in (("64MB", 64_000_000), ("512k", 512_000), ("1000", 1000), ("1.5GB", 1_500_000_000)):
        assert prepare.parse_size(size) == expected
    for bad in ("lots", "64 parsecs", "0MB"):
        with pytest.raises(FinetuneError, match=r"^--chunk_bytes: "):
            prepare.parse_size(bad)
    with pytest.raises(FinetuneError, match=r"^--output: s3://b/x is a URL"):
        prepare.check_output("s3://b/x", overwrite=False)
    with pytest.raises(FinetuneError, match=r"^data.class_path: finetune prepare reads image folders and manifests"):
        prepare.build_datamodule(dict, {})
    with pytest.raises(FinetuneError, match=r"^--output: not set"):
        prepare.main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(colour_folder)])
