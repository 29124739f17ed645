"""`finetune check-data`: the report on generated messy folders (tests/bad_inputs.py), as a
table and as JSON, and its exit status on data no training can use."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from bad_inputs import good_image, write_fatal_cases, write_messy_classification, write_messy_segmentation

from finetune import check_data
from finetune.data import ImageFolderDataModule

REPO = Path(__file__).resolve().parents[1]


def test_report_on_a_messy_folder_as_table_and_json(tmp_path, capsys):
    messy = write_messy_classification(tmp_path / "messy")
    code = check_data.main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(messy.root),
                            "--data.image_size", "32", "--json", str(tmp_path / "report.json")])
    assert code == 0
    table = capsys.readouterr().out
    for text in ("Images per class", "sea lion", "café", "Skipped: 9 files", "bomb.png", "Identical files: 1 group",
                 "(conflicting labels)", "Small: 40 images under 32 px", "no fatal problem"):
        assert text in table, text
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["checked"] == "every pixel" and not report["fatal"]
    assert {row["path"] for row in report["skipped"]} == set(messy.skipped)
    reasons = {Path(row["path"]).name: row["reason"] for row in report["skipped"]}
    assert reasons["corrupt.png"] == "broken data stream when reading image file"
    assert reasons["empty class"].startswith("empty class folder")
    counts = report["counts"]
    assert list(counts["train"]) == ["café", "green", "linked class", "red", "sea lion"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 40
    assert report["imbalance"]["largest"] in ("green", "red") and report["imbalance"]["smallest"] == "linked class"
    [group] = report["duplicates"]
    assert [Path(p).relative_to(messy.root).as_posix() for p in group["paths"]] == [
        "green/link_to_red.png", "red/0.png", "red/copy_of_0.png"]
    assert group["classes"] == ["green", "red"]
    assert report["small"]["count"] == 40 and report["small"]["examples"][0]["path"].endswith("odd_tiny.png")


def test_the_same_image_in_train_and_val_is_flagged(tmp_path):
    for s, split in enumerate(("train", "val")):
        for n, name in enumerate(("a", "b")):
            for i in range(3):
                good_image(tmp_path / split / name / f"{i}.png", seed=100 * s + 10 * n + i)
    shutil.copy(tmp_path / "train" / "a" / "0.png", tmp_path / "val" / "b" / "leak.png")
    report = check_data.build(ImageFolderDataModule, {"root": str(tmp_path), "backbone": "resnet18", "image_size": 16})
    [group] = report.duplicates
    assert group["splits"] == ["train", "val"] and group["classes"] == ["a", "b"]
    assert "1 group(s) of identical files (1 across splits, 1 with different classes)" in report.warnings
    assert not report.fatal and not report.small["count"]


def test_segmentation_report_lists_mask_problems_and_uses_the_model_stride(tmp_path, capsys):
    messy = write_messy_segmentation(tmp_path / "messy")
    code = check_data.main(["--config", str(REPO / "configs" / "segment_quickstart.yaml"), "--data.root", str(messy.root),
                            "--model.output_stride", "8", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and not report["fatal"]
    kinds = {Path(row["path"]).relative_to(messy.root).as_posix(): row["kind"] for row in report["skipped"]}
    assert set(kinds) == {Path(p).relative_to(messy.root).as_posix() for p in messy.skipped}
    assert {p for p, kind in kinds.items() if kind == "mask"} == {
        "images/no_mask.png", "masks/rgb_mask.png", "masks/wrong_size.png", "masks/bad_labels.png", "masks/empty_mask.png"}
    reasons = {Path(row["path"]).name: row["reason"] for row in report["skipped"]}
    assert reasons["bad_labels.png"].startswith("mask values [7] are neither classes 0..2 nor data.ignore_index 255")
    assert reasons["rgb_mask.png"].startswith("mask is a RGB image")
    assert sum(report["pixels"]["train"].values()) == pytest.approx(1.0, abs=1e-3)
    assert report["counts"]["train"]["background"] > 0
    assert report["small"]["min_side"] == 8 and [e["path"] for e in report["small"]["examples"]] == [
        str(messy.root / "images" / "odd_tiny.png")]  # 3x2; the 12x8 images are not under 8 px


@pytest.fixture(scope="module")
def fatal_cases(tmp_path_factory):
    return write_fatal_cases(tmp_path_factory.mktemp("fatal"))


@pytest.mark.parametrize("case", ["empty", "no_images", "one_class", "unreadable_class"])
def test_data_no_training_can_use_is_fatal(fatal_cases, case):
    folder, error = fatal_cases[case]
    report = check_data.build(ImageFolderDataModule, {"root": str(folder), "backbone": "resnet18"})
    [fatal] = report.fatal
    assert re.search(error, fatal) and "\n" not in fatal


def test_check_data_command_exits_1_on_fatal_data(fatal_cases, monkeypatch, capsys):
    from finetune.commands import main

    folder, _ = fatal_cases["unreadable_class"]
    monkeypatch.setattr(sys, "argv", ["finetune", "check-data", "--config", str(REPO / "configs" / "quickstart.yaml"),
                                      "--data.root", str(folder), "--json", "-"])
    with pytest.raises(SystemExit) as excinfo:
        main()
    assert excinfo.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fatal"] == [(
        f"data.root: class 'b' has no readable image: none of its 2 file(s) under {folder / 'b'} can be used "
        "(e.g. empty.jpg: empty file (0 bytes)); fix them or remove the folder")]
