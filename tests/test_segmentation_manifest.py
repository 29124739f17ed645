"""Segmentation pairs from a manifest (finetune/data/manifest.py `parse_pairs`, read by
SegmentationFolderDataModule): any file layout, bad rows skipped and listed like bad files,
the splits the rows give or the folder reader's, the same batches as the folder layout."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_shape_images

from finetune import check_data
from finetune.commands import main
from finetune.data.bad_images import BadImageError, Problem
from finetune.data.manifest import parse_pairs, read_table
from finetune.data.segmentation import SegmentationFolderDataModule
from finetune.errors import FinetuneError
from finetune.tasks import SegmentationTask

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "red", "blue"]
FIX = "fix or remove it, or pass --data.on_bad_image skip to train without it"

# The rows of a flat folder of 000_img.png / 000_lbl.png ... 005_*: a bad row of each kind and a missing mask.
MESSY_ROWS = [
    "image,mask,split",
    "000_img.png,000_lbl.png,train",    # 2
    "001_img.png,001_lbl.png,train",    # 3
    "002_img.png,002_lbl.png,val",      # 4
    "003_img.png,003_lbl.png,test",     # 5
    ",004_lbl.png,train",               # 6 empty image path
    "004_img.png,,train",               # 7 empty mask path
    "004_img.png,004_lbl.png,holdout",  # 8 unknown split
    "./000_img.png,000_lbl.png,val",    # 9 same image as line 2
    "005_img.png,gone_lbl.png,train",   # 10 the mask file does not exist
    "004_img.png,004_lbl.png,",         # 11 no split: trains, as line 4 says val
]
ROW_REASONS = {
    6: "empty path in column 'image'; give the image's path",
    7: "empty path in column 'mask'; give the mask's path",
    8: "split 'holdout' is not one of train, training, val, valid, validation, dev, test, testing "
       "(or empty, to let data.val_fraction split the row)",
    9: "same image as line 2; remove one of the rows",
}


def write_flat(folder: Path, count: int, seed: int = 0) -> Path:
    """write_shape_images' pairs under folder/layout/{images,masks} (with classes.yaml), copied flat
    to folder/flat/<stem>_img.png + <stem>_lbl.png (with classes.yaml): the same pairs, two layouts."""
    layout, flat = folder / "layout", folder / "flat"
    write_shape_images(layout, count, seed)
    flat.mkdir()
    for image in sorted((layout / "images").iterdir()):
        shutil.copy(image, flat / f"{image.stem}_img.png")
        shutil.copy(layout / "masks" / image.name, flat / f"{image.stem}_lbl.png")
    for where in (layout, flat):
        (where / "classes.yaml").write_text("".join(f"- {name}\n" for name in CLASSES))
    return flat


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def datamodule(**kwargs) -> SegmentationFolderDataModule:
    kwargs = {"backbone": "resnet18", "num_workers": 0, "crop_size": 32, "batch_size": 2, **kwargs}
    return SegmentationFolderDataModule(**kwargs)


def stems(pairs) -> list[tuple[str, str]]:
    return [(Path(image).stem, Path(mask).stem) for image, mask in pairs]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- parse_pairs -----------------------------------------------------------------------------

def test_parse_pairs_finds_columns_resolves_paths_and_lists_bad_rows(tmp_path):
    table = write_manifest(tmp_path / "pairs.csv", [
        "Image_Path,Mask_Path,Subset",       # found case-insensitively: image_path, mask_path, subset
        "a_img.png,a_lbl.png,train",         # 2
        "/data/b_img.png,b/lbl.png,Validation",  # 3 absolute kept; split alias
        ",c_lbl.png,train",                  # 4 empty image path
        "c_img.png,,train",                  # 5 empty mask path
        "d_img.png,d_lbl.png,holdout",       # 6 unknown split
        "./x/../a_img.png,other.png,",       # 7 the image of line 2
        "e_img.png,e_lbl.png,test,extra",    # 8 a value more than the header
        "e_img.png,e_lbl.png,",              # 9 no split: the DataModule's to give
    ])
    parsed = parse_pairs(read_table(table), "pairs.csv", tmp_path / "base")
    base = tmp_path / "base"
    assert parsed.pairs == [
        (str(base / "a_img.png"), str(base / "a_lbl.png"), "train"),
        ("/data/b_img.png", str(base / "b" / "lbl.png"), "val"),
        (str(base / "e_img.png"), str(base / "e_lbl.png"), None),
    ]
    assert parsed.columns == {"image": "Image_Path", "mask": "Mask_Path", "split": "Subset"}
    assert parsed.source == "pairs.csv"
    assert parsed.problems == [
        Problem("pairs.csv:4", "empty path in column 'Image_Path'; give the image's path", "row"),
        Problem("pairs.csv:5", "empty path in column 'Mask_Path'; give the mask's path", "row"),
        Problem("pairs.csv:6", ROW_REASONS[8], "row"),
        Problem("pairs.csv:7", "same image as line 2; remove one of the rows", "row"),
        Problem("pairs.csv:8", "4 values but the header has 3 columns; quote values that contain the delimiter", "row"),
    ]


def test_parse_pairs_columns_named_missing_or_the_same_are_one_line():
    rows = [{"file": "a.png", "label": "a_mask.png", "_line": 2}]
    parsed = parse_pairs(rows, "m.csv", Path("/d"))
    assert parsed.pairs == [("/d/a.png", "/d/a_mask.png", None)]
    assert parsed.columns == {"image": "file", "mask": "label", "split": None}
    named = parse_pairs([{"x": "a", "y": "b", "z": "val", "_line": 2}], "m.csv", Path("/d"),
                        image_column="x", mask_column="y", split_column="z")
    assert named.pairs == [("/d/a", "/d/b", "val")]
    with pytest.raises(FinetuneError) as excinfo:
        parse_pairs([{"image": "a.png", "split": "val", "_line": 2}], "m.csv", Path("/d"))
    assert one_line(excinfo) == ("data.mask_column: manifest m.csv has none of the columns mask, mask_path, label, "
                                 "annotation, segmentation, target; its columns are image, split; name the column "
                                 "with data.mask_column")
    with pytest.raises(FinetuneError) as excinfo:
        parse_pairs(rows, "m.csv", Path("/d"), mask_column="seg")
    assert one_line(excinfo) == "data.mask_column: manifest m.csv has no column 'seg'; its columns are file, label"
    with pytest.raises(FinetuneError, match=r"^data\.mask_column: .* same column 'label'"):
        parse_pairs(rows, "m.csv", Path("/d"), image_column="label")
    with pytest.raises(FinetuneError) as excinfo:
        parse_pairs([{"image": "a.png", "mask": "", "_line": 2}], "m.csv", Path("/d"))
    assert one_line(excinfo) == ("data.manifest: m.csv has no usable row (1 bad: m.csv:2: empty path in column "
                                 "'mask'; give the mask's path)")


# --- the DataModule --------------------------------------------------------------------------

def test_rows_give_the_splits_and_bad_rows_are_listed_like_bad_files(tmp_path):
    flat = write_flat(tmp_path, 6)
    manifest = write_manifest(flat / "pairs.csv", MESSY_ROWS)  # relative paths: from the manifest's folder
    dm = datamodule(manifest=str(manifest), val_fraction=0.5)
    assert stems(dm.splits.train) == [("000_img", "000_lbl"), ("001_img", "001_lbl"), ("004_img", "004_lbl")]
    assert stems(dm.splits.val) == [("002_img", "002_lbl")]  # a row says val: no val_fraction split
    assert stems(dm.splits.test) == [("003_img", "003_lbl")]
    assert dm.class_names == CLASSES  # the manifest folder's classes.yaml
    expected = {f"{manifest}:{line}": (reason, "row", "setup") for line, reason in ROW_REASONS.items()}
    expected[str(flat / "gone_lbl.png")] = ("file not found", "mask", "setup")
    assert dm.bad_files.records == expected
    # what `finetune check-data` lists, and the run's skipped_images.csv
    assert {row["path"]: row["kind"] for row in dm.report.skipped} == {path: kind for path, (_, kind, _) in expected.items()}
    assert dm.report.root == str(manifest)
    assert next(iter(dm.test_dataloader()))["path"] == [str(flat / "003_img.png")]


def test_on_bad_image_raise_stops_at_the_first_bad_row_or_file(tmp_path):
    flat = write_flat(tmp_path, 6)
    manifest = write_manifest(flat / "pairs.csv", MESSY_ROWS)
    with pytest.raises(BadImageError) as excinfo:
        datamodule(manifest=str(manifest), on_bad_image="raise")
    assert one_line(excinfo) == (f"{manifest}:6: {ROW_REASONS[6]} (3 more unusable files: `finetune check-data` "
                                 f"lists them); {FIX}")
    rows_fine = write_manifest(flat / "fine_rows.csv", [MESSY_ROWS[0], *MESSY_ROWS[1:5], MESSY_ROWS[9]])
    with pytest.raises(BadImageError) as excinfo:
        datamodule(manifest=str(rows_fine), on_bad_image="raise")
    assert one_line(excinfo) == f"{flat / 'gone_lbl.png'}: file not found; {FIX}"


@pytest.mark.parametrize("split_column", [False, True], ids=["no_split_column", "train_or_empty"])
def test_rows_without_val_are_split_like_the_folder_and_give_the_same_batches(tmp_path, split_column):
    flat = write_flat(tmp_path, 10)
    names = [f"{i:03d}" for i in (7, 2, 9, 0, 5, 1, 8, 3, 6, 4)]  # any order: the split sorts
    if split_column:
        lines = ["image,mask,split", *(f"{n}_img.png,{n}_lbl.png,{'train' if int(n) % 2 else ''}" for n in names)]
    else:
        lines = ["image,mask", *(f"{n}_img.png,{n}_lbl.png" for n in names)]
    lists = tmp_path / "lists"
    lists.mkdir()
    # Relative to data.root, not to the manifest's folder (which has no class list: root's is read).
    manifest = write_manifest(lists / "pairs.csv", lines)
    settings = dict(val_fraction=0.3, seed=1, crop_size=32, scale=(0.75, 1.25), batch_size=3)
    from_manifest = datamodule(manifest=str(manifest), root=str(flat), **settings)
    from_folder = datamodule(root=str(tmp_path / "layout"), **settings)

    def layout_stems(pairs):
        return [(image.removesuffix("_img"), mask.removesuffix("_lbl")) for image, mask in stems(pairs)]

    assert (len(from_folder.splits.train), len(from_folder.splits.val)) == (7, 3)  # round(10 * 0.3)
    assert layout_stems(from_manifest.splits.train) == stems(from_folder.splits.train)
    assert layout_stems(from_manifest.splits.val) == stems(from_folder.splits.val)
    assert from_manifest.class_names == from_folder.class_names == CLASSES
    loaders = [(from_manifest.val_dataloader(), from_folder.val_dataloader())]
    train = [from_manifest.train_dataloader(), from_folder.train_dataloader()]
    for loader in train:
        loader.sampler.set_epoch(2)
    loaders.append(train)
    for a_loader, b_loader in loaders:
        batches = list(zip(a_loader, b_loader, strict=True))
        assert batches
        for a, b in batches:
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert [Path(p).name.replace("_img", "") for p in a["path"]] == [Path(p).name for p in b["path"]]


def test_class_list_root_and_missing_settings(tmp_path):
    flat = write_flat(tmp_path, 4)
    lists = tmp_path / "lists"
    lists.mkdir()
    manifest = write_manifest(lists / "pairs.csv", ["mask,image,split"] + [
        f"{n}_lbl.png,{n}_img.png,{'val' if n == '003' else ''}" for n in ("000", "001", "002", "003")])
    (flat / "classes.yaml").unlink()
    (flat / "classes.txt").write_text("bg\nr\nb\n")
    (lists / "classes.yaml").write_text("[background, red, blue]\n")
    assert datamodule(manifest=str(manifest), root=str(flat)).class_names == ["bg", "r", "b"]  # root's wins
    (flat / "classes.txt").unlink()
    dm = datamodule(manifest=str(manifest), root=str(flat))
    assert dm.class_names == CLASSES  # else the manifest folder's
    assert stems(dm.splits.val) == [("003_img", "003_lbl")] and len(dm.splits.train) == 3
    with pytest.raises(ValueError) as excinfo:
        dm.test_dataloader()
    assert one_line(excinfo) == f"data.manifest: {manifest} has no row with split `test`; mark the rows to test on"
    assert datamodule(manifest=str(manifest), root=str(flat), class_names=["x", "y", "z"]).class_names == ["x", "y", "z"]
    (lists / "classes.yaml").unlink()
    with pytest.raises(ValueError) as excinfo:
        datamodule(manifest=str(manifest), root=str(flat))
    assert one_line(excinfo) == (f"data.manifest: no class list; add classes.yaml (a list of names, index 0 first) "
                                 f"or classes.txt to {flat} or {lists}, or pass --data.class_names [background,...]")
    with pytest.raises(FileNotFoundError, match=rf"^data\.root: {tmp_path / 'nowhere'} is not a folder; with data"):
        datamodule(manifest=str(manifest), root=str(tmp_path / "nowhere"), class_names=CLASSES)
    with pytest.raises(ValueError) as excinfo:
        datamodule(class_names=CLASSES)
    assert one_line(excinfo).startswith("data.root: not set; point it at a folder of images/ + masks/, or set data.manifest")
    only_val = write_manifest(flat / "val.csv", ["image,mask,split", "000_img.png,000_lbl.png,val"])
    with pytest.raises(ValueError) as excinfo:
        datamodule(manifest=str(only_val), class_names=CLASSES)
    assert one_line(excinfo).startswith(f"data.manifest: {only_val} has no usable training pair (0 skipped")


def test_training_reads_the_manifest_and_lists_skipped_rows(tmp_path):
    flat = write_flat(tmp_path, 6)
    manifest = write_manifest(flat / "pairs.csv", MESSY_ROWS)
    dm = datamodule(manifest=str(manifest))
    task = SegmentationTask(dm.num_classes, backbone="resnet18", pretrained=False, class_names=dm.class_names,
                            aspp_channels=16, aux_loss_weight=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run")
    trainer.fit(task, dm)
    assert trainer.global_step == 1  # 3 training pairs in batches of 2, the last incomplete one dropped
    assert torch.isfinite(trainer.callback_metrics["val/miou"])
    with (tmp_path / "run" / "skipped_images.csv").open() as f:
        listed = {row["path"]: row["kind"] for row in csv.DictReader(f)}
    assert listed == {**{f"{manifest}:{line}": "row" for line in ROW_REASONS}, str(flat / "gone_lbl.png"): "mask"}


def test_the_cli_reads_a_manifest_and_stops_on_a_bad_row_in_one_line(tmp_path, monkeypatch, capsys):
    flat = write_flat(tmp_path, 6)
    manifest = write_manifest(flat / "pairs.csv", MESSY_ROWS)
    # The config's data.root is a folder; null: relative paths start at the manifest's folder.
    data = ["--config", str(REPO / "configs" / "segment_quickstart.yaml"), "--data.root", "null",
            "--data.manifest", str(manifest), "--data.num_workers", "0"]
    assert check_data.main([*data, "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["root"] == str(manifest) and f"{manifest}:9" in {row["path"] for row in report["skipped"]}
    # every pixel read: images per class; each shapes image has background, red and blue
    assert report["counts"] == {"train": dict.fromkeys(CLASSES, 3), "val": dict.fromkeys(CLASSES, 1),
                                "test": dict.fromkeys(CLASSES, 1)}
    monkeypatch.setattr(sys, "argv", ["finetune", "fit", *data, "--data.on_bad_image", "raise",
                                      "--model.pretrained", "false", "--trainer.logger", "false",
                                      "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert "Traceback" not in capsys.readouterr().err
    assert exit_.value.code == f"error: {manifest}:6: {ROW_REASONS[6]} (3 more unusable files: `finetune check-data` " \
                               f"lists them); {FIX}"
