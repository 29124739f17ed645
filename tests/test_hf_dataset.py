"""Hugging Face datasets as manifest rows: images written once as files, labels as names, splits mapped."""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage

from finetune.data import hf_dataset
from finetune.data.hf_dataset import INSTALL_HINT, hf_rows, hub_reachable
from finetune.errors import FinetuneError

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _caches_in_tmp(tmp_path, monkeypatch):
    """Our image cache and datasets' own Arrow cache (Parquet loads) stay in tmp_path."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "finetune-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def pixels(seed: int, size: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def decoded(path: str) -> np.ndarray:
    with PILImage.open(path) as image:
        return np.asarray(image.convert("RGB"))


def image_dataset(seeds: list[int], labels: list, label_feature) -> Dataset:
    images = [{"bytes": encoded(pixels(seed), "PNG"), "path": None} for seed in seeds]
    features = Features({"image": Image(), "label": label_feature})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture
def saved_dict(tmp_path) -> Path:
    """train: 3 PNGs (cat, dog, cat), validation: 1 (dog), saved with save_to_disk."""
    animals = ClassLabel(names=["cat", "dog"])
    folder = tmp_path / "saved"
    DatasetDict(
        train=image_dataset([0, 1, 2], [0, 1, 0], animals),
        validation=image_dataset([3], [1], animals),
    ).save_to_disk(str(folder))
    return folder


def test_save_to_disk_rows_point_at_written_files_with_the_original_pixels(saved_dict, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.data.hf_dataset"):
        rows, class_names = hf_rows(str(saved_dict))

    assert class_names == ["cat", "dog"]
    assert [(row["label"], row["split"], row["_line"]) for row in rows] == [
        ("cat", "train", 1), ("dog", "train", 2), ("cat", "train", 3), ("dog", "val", 4),
    ]
    cache = tmp_path / "finetune-cache" / "hf-images"
    for row, seed in zip(rows, [0, 1, 2, 3]):
        path = Path(row["path"])
        assert path.is_file() and cache in path.parents and path.suffix == ".png"
        assert np.array_equal(decoded(row["path"]), pixels(seed))
    assert Path(rows[0]["path"]).name == "00000000.png" and Path(rows[3]["path"]).parent.parent.name == "validation"
    wrote = [record.getMessage() for record in caplog.records if "wrote" in record.getMessage()]
    assert len(wrote) == 2 and wrote[0].startswith(f"hf dataset {saved_dict}: wrote 3 images to ")
    assert not list(cache.rglob("*.tmp"))


def test_a_second_call_writes_nothing_and_an_interrupted_one_writes_only_what_is_missing(saved_dict, caplog):
    first, _ = hf_rows(str(saved_dict))
    stamps = {row["path"]: os.stat(row["path"]).st_mtime_ns for row in first}
    files = set(Path(first[0]["path"]).parent.iterdir())

    with caplog.at_level(logging.INFO, logger="finetune.data.hf_dataset"):
        second, _ = hf_rows(str(saved_dict))
    assert second == first
    assert {row["path"]: os.stat(row["path"]).st_mtime_ns for row in second} == stamps
    assert set(Path(first[0]["path"]).parent.iterdir()) == files
    assert not [record for record in caplog.records if "wrote" in record.getMessage()]

    Path(first[1]["path"]).unlink()  # as if the first run had stopped before writing this image
    with caplog.at_level(logging.INFO, logger="finetune.data.hf_dataset"):
        third, _ = hf_rows(str(saved_dict))
    assert third == first and np.array_equal(decoded(third[1]["path"]), pixels(1))
    assert os.stat(third[0]["path"]).st_mtime_ns == stamps[third[0]["path"]]
    assert "wrote 1 images" in caplog.records[-1].getMessage()


def test_a_list_of_class_labels_gives_list_labels(tmp_path):
    tags = Sequence(ClassLabel(names=["indoor", "person", "dog"]))
    folder = tmp_path / "tags"
    image_dataset([0, 1, 2], [[1, 2], [], [0]], tags).save_to_disk(str(folder))

    rows, class_names = hf_rows(str(folder))

    assert class_names == ["indoor", "person", "dog"]
    assert [row["label"] for row in rows] == [["person", "dog"], [], ["indoor"]]
    assert {row["split"] for row in rows} == {"train"}  # a plain Dataset is training data


def test_parquet_folder_keeps_jpeg_bytes_and_reencodes_gif(tmp_path):
    jpeg, gif = encoded(pixels(5), "JPEG"), encoded(pixels(6), "GIF")
    folder = tmp_path / "parquet" / "data"
    features = Features({"img": Image(), "label": Value("string")})
    train = {"img": [{"bytes": jpeg, "path": None}, {"bytes": gif, "path": None}], "label": ["cat", "dog"]}
    Dataset.from_dict(train, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    test = {"img": [{"bytes": encoded(pixels(7), "PNG"), "path": None}], "label": ["dog"]}
    Dataset.from_dict(test, features=features).to_parquet(str(folder / "test-00000-of-00001.parquet"))

    rows, class_names = hf_rows(str(tmp_path / "parquet"), image_column="img")

    assert class_names is None
    assert [(row["label"], row["split"], Path(row["path"]).suffix) for row in rows] == [
        ("cat", "train", ".jpg"), ("dog", "train", ".png"), ("dog", "test", ".png"),
    ]
    assert Path(rows[0]["path"]).read_bytes() == jpeg  # stored as it was: no re-encoding loss
    with PILImage.open(io.BytesIO(gif)) as original:
        assert np.array_equal(decoded(rows[1]["path"]), np.asarray(original.convert("RGB")))
    assert np.array_equal(decoded(rows[2]["path"]), pixels(7))
    single, _ = hf_rows(str(folder / "test-00000-of-00001.parquet"), image_column="img")
    assert [(row["label"], row["split"]) for row in single] == [("dog", "train")]


def test_local_image_files_and_path_columns_are_used_in_place(tmp_path):
    files = []
    for seed in (0, 1):
        files.append(str(tmp_path / f"photo{seed}.png"))
        PILImage.fromarray(pixels(seed)).save(files[-1])
    # As datasets loaded from the hub's downloads store images: a path, no bytes (save_to_disk and
    # to_parquet would embed the bytes).
    features = Features({"image": Image(), "label": Value("int64")})
    images = [{"bytes": None, "path": file} for file in files]
    pq.write_table(pa.table({"image": images, "label": [3, 4]}, schema=features.arrow_schema),
                   tmp_path / "images.parquet")
    Dataset.from_dict({"file": ["a/b.jpg", None], "label": ["x", "y"]}).save_to_disk(str(tmp_path / "paths"))

    rows, _ = hf_rows(str(tmp_path / "images.parquet"))
    paths, _ = hf_rows(str(tmp_path / "paths"), image_column="file")

    assert [(row["path"], row["label"]) for row in rows] == [(files[0], "3"), (files[1], "4")]
    assert [row["path"] for row in paths] == ["a/b.jpg", ""]
    assert not (tmp_path / "finetune-cache").exists()


def test_splits_can_be_mapped(saved_dict):
    rows, _ = hf_rows(str(saved_dict), splits={"train": "validation", "test": "train"})
    assert [row["split"] for row in rows] == ["train", "test", "test", "test"]
    assert [row["label"] for row in rows] == ["dog", "cat", "dog", "cat"]


@pytest.mark.parametrize("kwargs, message", [
    ({"splits": {"val": "dev"}}, "data.hf_splits: {name} has no split 'dev'; its splits are train, validation"),
    ({"splits": {"valid": "validation"}}, "data.hf_splits: 'valid' is not one of train, val, test; "
                                          "the keys are our splits, the values the dataset's"),
    ({"image_column": "picture"}, "data.image_column: {name} has no column 'picture'; its columns are image, label"),
    ({"label_column": "class"}, "data.label_column: {name} has no column 'class'; its columns are image, label"),
    ({"config": "small"}, "data.hf_config: 'small' names a configuration of a hub dataset; {name} is local, "
                          "leave data.hf_config out"),
])
def test_a_wrong_setting_is_one_line_naming_its_key(saved_dict, kwargs, message):
    with pytest.raises(FinetuneError) as raised:
        hf_rows(str(saved_dict), **kwargs)
    assert str(raised.value) == message.format(name=saved_dict)


def test_a_missing_local_folder_is_one_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"^data\.hf_dataset: .*nowhere does not exist; point data\.hf_dataset"):
        hf_rows(str(tmp_path / "nowhere"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(FinetuneError, match=r"notes is neither a save_to_disk folder \(it has no dataset_dict"):
        hf_rows(str(tmp_path / "notes"))


OFFLINE_MESSAGE = (
    "data.hf_dataset: 'nobody-here/no-such-dataset' is neither a local folder nor reachable on the Hugging Face "
    "Hub (offline: Couldn't reach 'nobody-here/no-such-dataset' on the Hub (OfflineModeIsEnabled)); download it "
    "once online, or point data.hf_dataset at a save_to_disk folder or Parquet files"
)


def test_an_uncached_hub_name_offline_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(FinetuneError) as raised:
        hf_rows("nobody-here/no-such-dataset")
    assert str(raised.value) == OFFLINE_MESSAGE
    assert time.monotonic() - start < 10


def test_an_unreachable_hub_switches_to_offline_mode_for_the_call(monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_dataset, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(FinetuneError) as raised:
        hf_rows("nobody-here/no-such-dataset")
    assert str(raised.value) == OFFLINE_MESSAGE
    assert time.monotonic() - start < 10
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored


def test_hub_probe_gives_up_on_a_silent_endpoint_and_accepts_any_answer(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # else huggingface_hub refuses every request
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    start = time.monotonic()
    assert hub_reachable(timeout=0.5) is False
    assert time.monotonic() - start < 2
    silent.close()

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert hub_reachable(timeout=2) is True
    finally:
        server.shutdown()
        server.server_close()


def test_without_the_datasets_package_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(FinetuneError) as raised:
        hf_rows("anything")
    assert str(raised.value) == (
        "data.hf_dataset: reading Hugging Face datasets needs the datasets package; pip install 'finetune[hf]'"
    )
    assert INSTALL_HINT == "pip install 'finetune[hf]'"
