"""`finetune interpret` and finetune.interpretation: top losses, most confused pairs and
confident learning on hand-computed probabilities; the command end to end on a tiny run with
one deliberately mislabelled training image."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.interpret_command import interpret_module, main
from finetune.interpretation import Interpretation, Row

REPO = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]
# label, probabilities (a, b, c). Thresholds (mean p of the labelled class over its samples):
# t_a = (.9 + .7 + .4) / 3 = .6667, t_b = (.8 + .6 + .1 + .35) / 4 = .4625, t_c = (.8 + .6 + .4) / 3 = .6.
SAMPLES = [
    (0, [0.90, 0.05, 0.05]),  # 0 right and confident
    (0, [0.70, 0.20, 0.10]),  # 1
    (1, [0.10, 0.80, 0.10]),  # 2
    (1, [0.20, 0.60, 0.20]),  # 3
    (2, [0.10, 0.10, 0.80]),  # 4
    (1, [0.85, 0.10, 0.05]),  # 5 flipped: p_a .85 >= t_a, p_b .1 < t_b -> confidently a, labelled b
    (0, [0.40, 0.45, 0.15]),  # 6 predicted b, but p_b .45 < t_b: no class confident, not flagged
    (2, [0.30, 0.10, 0.60]),  # 7
    (2, [0.05, 0.55, 0.40]),  # 8 p_b .55 >= t_b, p_c .4 < t_c -> confidently b, labelled c
    (1, [0.55, 0.35, 0.10]),  # 9 predicted a, but p_a .55 < t_a and p_b .35 < t_b: not flagged
]


@pytest.fixture
def interpretation() -> Interpretation:
    labels = torch.tensor([label for label, _ in SAMPLES])
    probabilities = torch.tensor([p for _, p in SAMPLES])
    return Interpretation(probabilities, labels, [f"img{i}.png" for i in range(len(SAMPLES))], NAMES)


def test_top_losses_are_cross_entropy_of_the_labelled_class_highest_first(interpretation):
    top = interpretation.top_losses(4)
    # -ln .1, -ln .35, then -ln .4 twice (6 and 8: ties keep sample order)
    assert [row.path for row in top] == ["img5.png", "img9.png", "img6.png", "img8.png"]
    assert [row.loss for row in top] == pytest.approx([2.302585, 1.049822, 0.916291, 0.916291], abs=1e-5)
    assert top[0] == pytest.approx(Row("img5.png", "b", "a", 0.85, 0.10, -math.log(0.10)))
    assert len(interpretation.top_losses()) == len(SAMPLES)


def test_most_confused_counts_off_diagonal_pairs_most_first(interpretation):
    # true b predicted a: 5 and 9; a as b: 6; c as b: 8. Ties in class order, as fastai's.
    assert interpretation.most_confused() == [("b", "a", 2), ("a", "b", 1), ("c", "b", 1)]
    assert interpretation.most_confused(min_count=2) == [("b", "a", 2)]
    assert interpretation.confusion_matrix().tolist() == [[2, 1, 0], [2, 2, 0], [0, 1, 2]]


def test_confident_learning_finds_the_flipped_labels_not_the_unsure_or_confident_right(interpretation):
    assert interpretation.thresholds().tolist() == pytest.approx([2 / 3, 0.4625, 0.6], abs=1e-6)
    # -1: no class reaches its threshold (6, 9); 7: p_c .6 = t_c counts (cleanlab's slack for rounding)
    assert interpretation.confident_class().tolist() == [0, 0, 1, 1, 2, 0, -1, 2, 1, -1]
    doubtful = interpretation.likely_mislabelled()
    # ranked by margin: 5: .85 - .10 = .75, 8: .55 - .40 = .15
    assert [row.path for row in doubtful] == ["img5.png", "img8.png"]
    assert (doubtful[0].true, doubtful[0].predicted) == ("b", "a")


def test_a_class_nobody_is_labelled_with_is_never_confident():
    result = Interpretation(torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([0, 0]), ["x", "y"], ["p", "q"])
    assert result.thresholds()[1] == math.inf
    assert result.likely_mislabelled() == []


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^interpretation: probabilities \(2, 2\), labels \(3,\)"):
        Interpretation(torch.rand(2, 2), torch.tensor([0, 1, 1]), ["x", "y"], ["p", "q"])
    with pytest.raises(ValueError, match="single-label"):
        Interpretation(torch.rand(2, 2), torch.tensor([0, 2]), ["x", "y"], ["p", "q"])


def test_csvs_list_every_sample_by_loss_and_every_confused_pair(interpretation, tmp_path):
    rows = list(csv.DictReader(interpretation.write_csv(tmp_path / "all.csv").open()))
    assert list(rows[0]) == ["path", "true", "predicted", "p_predicted", "p_true", "loss", "likely_mislabelled"]
    assert [r["path"] for r in rows[:4]] == ["img5.png", "img9.png", "img6.png", "img8.png"] and len(rows) == 10
    assert (rows[0]["true"], rows[0]["predicted"], rows[0]["p_predicted"], rows[0]["p_true"], rows[0]["loss"]) == (
        "b", "a", "0.850000", "0.100000", "2.302585")
    assert sorted(r["path"] for r in rows if r["likely_mislabelled"] == "true") == ["img5.png", "img8.png"]
    confused = list(csv.reader(interpretation.write_confused_csv(tmp_path / "confused.csv").open()))
    assert confused == [["true", "predicted", "count"], ["b", "a", "2"], ["a", "b", "1"], ["c", "b", "1"]]


def test_top_losses_figure_shows_the_images_read_from_their_paths(interpretation, tmp_path):
    paths = []
    for i in range(len(SAMPLES)):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (40, 30), (25 * i, 0, 0)).save(paths[-1])
    interpretation.paths = [str(p) for p in paths]
    paths[5].unlink()  # the highest loss: an empty panel, no error
    read: list[str] = []

    def reader(path):
        read.append(Path(path).name)
        with Image.open(path) as image:
            return np.asarray(image)

    figure = interpretation.top_losses_figure(tmp_path / "top.png", k=4, images=reader)
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200
    assert read == ["img5.png", "img9.png", "img6.png", "img8.png"]
    interpretation.top_losses_figure(tmp_path / "default.png")  # 9 images read with PIL
    assert (tmp_path / "default.png").stat().st_size > 1000


# -- the command, end to end -------------------------------------------------------------------


def interpret(*args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in args])
    return out.getvalue().splitlines()


@pytest.fixture(scope="module")
def run(colour_folder, tmp_path_factory) -> tuple[Path, Path]:
    """(the data, the run folder) of a 4-epoch quickstart at 32 px whose train/green/ holds a red image."""
    from finetune.cli import create_cli

    data = tmp_path_factory.mktemp("mislabelled") / "colours"
    shutil.copytree(colour_folder, data)
    shutil.copy(data / "train" / "red" / "red_003.png", data / "train" / "green" / "mislabelled.png")
    folder = tmp_path_factory.mktemp("run")
    create_cli([
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(data),
        "--data.image_size", "32", "--data.batch_size", "16", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(folder), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.max_epochs", "4", "--model.lr", "0.003", "--model.pretrained", "false",
    ])
    return data, folder


def test_interpret_train_puts_the_mislabelled_image_on_top(run):
    data, folder = run
    printed = interpret("--ckpt_path", folder / "checkpoints" / "last.ckpt", "--split", "train", "--device", "cpu")
    report = folder / "report"
    rows = list(csv.DictReader((report / "interpret-train.csv").open()))
    assert len(rows) == 49  # 16 per class + the mislabelled copy
    top = rows[0]
    assert (Path(top["path"]).name, top["true"], top["predicted"]) == ("mislabelled.png", "green", "red")
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[0] > 2 * losses[1]
    confused = list(csv.DictReader((report / "confused-train.csv").open()))
    assert {"true": "green", "predicted": "red", "count": "1"} in confused
    with Image.open(report / "top_losses-train.png") as figure:
        assert figure.format == "PNG"
    flagged = sum(r["likely_mislabelled"] == "true" for r in rows)
    assert 3 <= len(printed) <= 5
    assert printed[0] == f"train: 49 images, {sum(r['true'] == r['predicted'] for r in rows)} predicted right " \
                         f"({sum(r['true'] == r['predicted'] for r in rows) / 49:.1%}), 3 classes"
    assert "green as red (1)" in printed[1]
    assert printed[2].startswith(f"likely mislabelled (confident learning): {flagged}")
    assert str(report / "interpret-train.csv") in printed[3]


def test_interpret_module_matches_the_command_on_the_val_loader(run, tmp_path):
    from finetune.data import ImageFolderDataModule
    from finetune.tasks import ClassificationTask

    data, folder = run
    ckpt = folder / "checkpoints" / "last.ckpt"
    interpret("--ckpt_path", ckpt, "--output", tmp_path, "--batch_size", "5", "--device", "cpu")  # default split: val
    by_path = {r["path"]: float(r["p_true"]) for r in csv.DictReader((tmp_path / "interpret-val.csv").open())}
    assert len(by_path) == 24

    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu", pretrained=False).train()
    dm = ImageFolderDataModule(str(data), backbone="resnet18", image_size=32, batch_size=7, num_workers=0)
    result = interpret_module(task, dm.val_dataloader())
    assert task.training  # its mode is put back
    assert {path: float(p) for path, p in zip(result.paths, result.p_true)} == pytest.approx(by_path, abs=1e-5)

    class NoPaths(torch.utils.data.Dataset):  # a dataset whose batches carry no path: items give them
        def __init__(self, dataset):
            self.dataset, self.items = dataset, dataset.items

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            return {k: v for k, v in self.dataset[index].items() if k != "path"}

    loader = torch.utils.data.DataLoader(NoPaths(dm.dataset(dm.splits.val, train=False)), batch_size=10)
    assert interpret_module(task, loader).paths == result.paths


def test_moved_data_is_named_with_the_flag_that_fixes_it(run, tmp_path):
    data, folder = run
    raw = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    raw["datamodule_hyper_parameters"]["root"] = str(tmp_path / "gone")
    torch.save(raw, tmp_path / "moved.ckpt")
    with pytest.raises(SystemExit) as error:
        interpret("--ckpt_path", tmp_path / "moved.ckpt", "--output", tmp_path)
    assert str(error.value) == (f"finetune interpret: data.root: {tmp_path / 'gone'} (where the checkpoint was "
                                "trained) is not a folder; if the data moved, pass --data_root NEW_FOLDER")
    printed = interpret("--ckpt_path", tmp_path / "moved.ckpt", "--output", tmp_path, "--data_root", data)
    assert printed[0].startswith("val: 24 images")


@pytest.mark.parametrize("args, message", [
    (["--split", "valid"], "argument --split: invalid choice: 'valid'"),
    (["--split", "test"], "--split test: the data"),
    (["--batch_size", "0"], "argument --batch_size: expected a positive number"),
])
def test_bad_arguments_are_one_line(run, args, message):
    _, folder = run
    with pytest.raises(SystemExit, match=r"^finetune interpret: ") as error:
        interpret("--ckpt_path", folder / "checkpoints" / "last.ckpt", *args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_checkpoint_and_other_tasks_are_refused_in_one_line(tmp_path):
    from finetune.export.metadata import plain
    from finetune.tasks import SegmentationTask

    with pytest.raises(SystemExit, match=r"^finetune interpret: --ckpt_path: .*nothing.ckpt does not exist"):
        interpret("--ckpt_path", tmp_path / "nothing.ckpt")
    task = SegmentationTask(3, backbone="resnet18", pretrained=False)
    hparams = plain({**task.hparams, "_class_path": "finetune.tasks.SegmentationTask"})
    torch.save({"hyper_parameters": hparams, "state_dict": task.state_dict()}, tmp_path / "segmentation.ckpt")
    with pytest.raises(SystemExit) as error:
        interpret("--ckpt_path", tmp_path / "segmentation.ckpt")
    assert str(error.value) == (f"finetune interpret: --ckpt_path: {tmp_path / 'segmentation.ckpt'} is a segmentation "
                                "checkpoint; interpret supports single-label classification "
                                "(finetune.tasks.ClassificationTask) only")
