"""The recipe beyond the schedule: mixup/cutmix, EMA of the weights, test-time flips, class
weights, balanced metrics and the LR found by the range test."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.callbacks.ema import EMA
from finetune.callbacks.media import normalized_rows
from finetune.data import ImageFolderDataModule
from finetune.export.checkpoint import load_checkpoint
from finetune.models import Classifier
from finetune.tasks import ClassificationTask
from finetune.tasks.classification import inverse_frequency_weights
from finetune.tasks.mixing import BatchMixing

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


# -- mixup / cutmix ---------------------------------------------------------------------------

@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
@pytest.mark.parametrize("batch", [1, 5, 8])
def test_mixed_targets_are_distributions_and_images_change(mixup, cutmix, batch):
    mixing = BatchMixing(4, mixup, cutmix, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    images, labels = torch.randn(batch, 3, 16, 16), torch.arange(batch) % 4
    mixed, targets = mixing(images.clone(), labels, step=3)
    assert mixed.shape == images.shape and targets.shape == (batch, 4)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch))
    assert targets.min() >= 0.1 / 4 - 1e-6  # label smoothing spreads 0.1 over the classes
    if batch > 1:
        assert not torch.equal(mixed, images)
    else:  # a batch of one is mixed with itself: unchanged, and so is its target
        torch.testing.assert_close(mixed, images)
        assert targets.argmax().item() == labels.item()


def test_mixing_is_a_function_of_the_step_and_leaves_the_global_generator_alone():
    mixing = BatchMixing(3, 0.8, 1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.0)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    state = torch.get_rng_state()
    a, ta = mixing(images.clone(), labels, step=7)
    assert torch.equal(torch.get_rng_state(), state)
    b, tb = mixing(images.clone(), labels, step=7)
    c, tc = mixing(images.clone(), labels, step=8)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not (torch.equal(a, c) and torch.equal(ta, tc))


def test_mixing_off_gives_smoothed_one_hot_targets():
    mixing = BatchMixing(3, 0.8, 0.0, prob=0.0, switch_prob=0.5, label_smoothing=0.3)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    out, targets = mixing(images.clone(), labels, step=0)
    assert torch.equal(out, images)
    torch.testing.assert_close(targets, F.one_hot(labels, 3) * 0.7 + 0.1)


def test_a_run_resumed_with_mixup_and_ema_ends_with_the_uninterrupted_weights(colour_folder, tmp_path):
    def fit(ckpt_path=None):
        L.seed_everything(0)
        dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
        task = ClassificationTask(dm.num_classes, "resnet18", pretrained=False, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(max_epochs=2, callbacks=[EMA(decay=0.9), saver], num_sanity_val_steps=0, **QUIET)
        trainer.fit(task, dm, ckpt_path=ckpt_path)
        return torch.load(tmp_path / "epoch=1-step=6.ckpt", weights_only=True)

    uninterrupted = fit()
    resumed = fit(ckpt_path=tmp_path / "epoch=0-step=3.ckpt")  # mixing draws again from (seed, step, rank)
    for key in ("state_dict", "current_model_state"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


# -- EMA on a model small enough to average by hand ---------------------------------------------

class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.net.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class RecordWeights(L.Callback):
    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append(pl_module.net.weight.detach().clone())


def linear_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def test_ema_is_the_hand_computed_average_and_validation_and_checkpoints_use_it(tmp_path):
    L.seed_everything(0)
    model, record, ema = Linear(), RecordWeights(), EMA(decay=0.75, warmup=False)
    trainer = L.Trainer(max_epochs=1, callbacks=[ema, record], default_root_dir=tmp_path, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, linear_data(), linear_data())
    # timm's ModelEmaV3: the first update copies, then ema = decay * ema + (1 - decay) * weights
    expected = record.weights[0]
    for weights in record.weights[1:]:
        expected = 0.75 * expected + 0.25 * weights
    torch.testing.assert_close(ema.ema.module.weight, expected)
    assert torch.equal(model.seen_in_validation[0], ema.ema.module.weight)  # validated on the average
    assert not torch.equal(record.weights[-1], expected)
    assert torch.equal(model.net.weight, ema.ema.module.weight)  # left holding the average after fit
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["net.weight"], expected)
    assert torch.equal(checkpoint["current_model_state"]["net.weight"], record.weights[-1])


def test_ema_and_weights_resume_bit_exactly(tmp_path):
    def fit(epochs, ckpt_path=None):
        L.seed_everything(0)
        model, ema = Linear(), EMA(decay=0.9)
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[ema, saver], num_sanity_val_steps=0, **QUIET)
        trainer.fit(model, linear_data(), linear_data(), ckpt_path=ckpt_path)
        return torch.load(tmp_path / f"epoch={epochs - 1}-step={4 * epochs}.ckpt", weights_only=True)

    uninterrupted = fit(3)
    resumed = fit(3, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    for key in ("state_dict", "current_model_state"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


def test_ema_is_built_in_the_precision_the_strategy_gives_the_network(tmp_path):
    L.seed_everything(0)
    model, ema = Linear(), EMA(decay=0.9)  # bf16-true converts the network after setup: the average must follow
    L.Trainer(max_epochs=1, callbacks=[ema], precision="bf16-true", num_sanity_val_steps=0, default_root_dir=tmp_path,
              **QUIET).fit(
        model, linear_data(), linear_data())
    assert ema.ema.module.weight.dtype == model.net.weight.dtype == torch.bfloat16
    assert len(model.seen_in_validation) == 4  # validated on the swapped-in average without a dtype clash


def test_ema_leaves_frozen_stages_exactly_as_they_were_and_is_what_export_loads(colour_folder, tmp_path):
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    task = ClassificationTask(dm.num_classes, "resnet18", pretrained=False, lr=1e-2, finetuning={"strategy": "frozen"})
    initial = {k: v.clone() for k, v in task.net.state_dict().items()}
    ema = EMA(decay=0.5)
    L.Trainer(max_epochs=1, callbacks=[ema], default_root_dir=tmp_path, **QUIET).fit(task, dm)
    averaged = ema.ema.module.state_dict()
    for name, value in averaged.items():
        if name.startswith("backbone."):
            assert torch.equal(value, initial[name]), name
    assert not torch.equal(averaged["head.classifier.1.weight"], initial["head.classifier.1.weight"])
    exported = load_checkpoint(next(tmp_path.rglob("*.ckpt"))).network.state_dict()  # what export and predict load
    for name, value in averaged.items():
        assert torch.equal(exported[name], value), name


# -- test-time augmentation ---------------------------------------------------------------------

def test_tta_flip_of_a_mirror_symmetric_image_changes_nothing():
    torch.manual_seed(0)
    plain = Classifier("resnet18", 3).eval()
    flipped = Classifier("resnet18", 3, tta_flip=True).eval()
    flipped.load_state_dict(plain.state_dict())
    half = torch.randn(2, 3, 32, 16)
    symmetric, asymmetric = torch.cat([half, half.flip(-1)], dim=-1), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(flipped.probabilities(symmetric), plain.probabilities(symmetric))
        assert not torch.allclose(flipped.probabilities(asymmetric), plain.probabilities(asymmetric))
        mean = (plain(asymmetric).softmax(1) + plain(asymmetric.flip(-1)).softmax(1)) / 2
        torch.testing.assert_close(flipped.predict(asymmetric)["probabilities"], mean)
        torch.testing.assert_close(flipped.evaluation_logits(asymmetric).exp().sum(1), torch.ones(2))


# -- class imbalance ----------------------------------------------------------------------------

def test_inverse_frequency_weights():
    assert inverse_frequency_weights([10, 10]) == [1.0, 1.0]
    assert inverse_frequency_weights([90, 10]) == pytest.approx([100 / 180, 100 / 20])
    assert inverse_frequency_weights([5, 0, 5]) == [1.0, 0.0, 1.0]


def test_class_weights_auto_weigh_the_loss_by_the_training_counts(colour_folder, tmp_path):
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    task = ClassificationTask(dm.num_classes, "resnet18", pretrained=False, class_weights="auto")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(task, dm)
    expected = inverse_frequency_weights(dm.class_counts)
    torch.testing.assert_close(task.loss_weights, torch.tensor(expected))
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 2, 2, 2])
    torch.testing.assert_close(task._loss(logits, labels), F.cross_entropy(logits, labels, weight=torch.tensor(expected)))
    assert "val/balanced_acc" in trainer.callback_metrics and "val/f1" in trainer.callback_metrics
    with pytest.raises(ValueError, match="model.class_weights: 2 weights for 3 classes"):
        ClassificationTask(3, "resnet18", pretrained=False, class_weights=[1.0, 2.0])


def test_confusion_rows_normalised_per_true_class():
    rows = normalized_rows(torch.tensor([[8, 2], [0, 0]]))
    torch.testing.assert_close(rows, torch.tensor([[0.8, 0.2], [0.0, 0.0]], dtype=torch.float64))


# -- a whole run with the strong options ---------------------------------------------------------

def test_mixup_ema_tta_and_found_lr_train_together(colour_folder, tmp_path, monkeypatch):
    from finetune.callbacks import lr_auto

    monkeypatch.setattr(lr_auto.LearningRateFromRangeTest.__init__, "__defaults__", (20,))  # a short range test
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    task = ClassificationTask(
        dm.num_classes, "resnet18", pretrained=False, lr="auto", mixup=0.4, cutmix=1.0, mixup_off_epochs=1,
        label_smoothing=0.1, tta_flip=True,
    )
    trainer = L.Trainer(max_epochs=2, callbacks=[EMA(decay=0.9)], default_root_dir=tmp_path, **QUIET)
    trainer.fit(task, dm)
    assert isinstance(task.hparams.lr, float) and task.hparams.lr != lr_auto.FALLBACK_LR
    head_lr = trainer.optimizers[0].param_groups[0]["initial_lr"]
    assert head_lr == pytest.approx(task.hparams.lr)  # the schedule was built around the found LR
    assert (tmp_path / "lr_find.csv").exists()
    assert trainer.callback_metrics["val/acc"] > 0.5  # chance is 1/3


def test_valley_suggests_an_lr_inside_the_fall_not_on_the_flat_noisy_start():
    from finetune.lr_find import valley

    lrs = [10 ** (-8 + 8 * i / 99) for i in range(100)]  # 1e-8 .. 1, as Lightning's range test
    generator = torch.Generator().manual_seed(0)
    noise = (torch.rand(100, generator=generator) * 0.05).tolist()
    # flat (a dip at the very start), falling from 1e-4 to 1e-1, then diverging
    losses = [2.0 + n - (0.3 if i == 12 else 0.0) for i, n in enumerate(noise[:50])]
    losses += [2.0 - 0.04 * i + noise[50 + i] * 0.1 for i in range(38)] + [0.5 * 1.5**i for i in range(12)]
    suggestion = valley(lrs, losses)
    assert 1e-4 < suggestion < 1e-1
    assert valley(lrs[:2], losses[:2]) is None
