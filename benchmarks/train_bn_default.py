"""Which `train_bn` default? Try both on a real transfer from a backbone pretrained here.

No hub here, so the "pretrained" backbone is made offline: ResNet-18 trained on Fashion-MNIST
classes 0-4 (t-shirt, trouser, pullover, dress, coat; images the sample does not contain).
It is then fine-tuned on the sample's other five classes (sandal, shirt, sneaker, bag,
ankle-boot) with each strategy, train_bn false and true, and the same seed. The pretraining
is transfer_data.py's, shared with recipes.py.

    apt-get install dataset-fashion-mnist
    python benchmarks/train_bn_default.py            # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_data import TARGET_CLASSES, pretrain, quiet_trainer  # noqa: E402

from finetune.data import ImageFolderDataModule  # noqa: E402
from finetune.tasks import ClassificationTask  # noqa: E402


def target_subset(sample: Path, work: Path) -> Path:
    for split in ("train", "val"):
        for name in TARGET_CLASSES:
            shutil.copytree(sample / split / name, work / "target" / split / name)
    return work / "target"


def finetune(root: Path, weights: Path, finetuning: dict, epochs: int) -> float:
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(root), backbone="resnet18", image_size=64, batch_size=32, num_workers=2)
    task = ClassificationTask(dm.num_classes, "resnet18", weights=str(weights), lr=1e-3, class_names=dm.class_names,
                              finetuning=finetuning)
    quiet_trainer(epochs).fit(task, dm)
    return task.trainer.callback_metrics["val/acc"].item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--pretrain-per-class", type=int, default=600)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    weights = pretrain(args.source, work, args.pretrain_per_class, args.pretrain_epochs)
    root = target_subset(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-sample", work)
    print(f"fine-tuning on {TARGET_CLASSES} (500 train / 100 val images), {args.epochs} epochs, seed 0")
    print(f"{'strategy':<22}{'train_bn=false':>16}{'train_bn=true':>16}")
    for strategy, extra in (("frozen", {}), ("freeze_then_unfreeze", {"unfreeze_at": [2]}),
                            ("gradual", {"unfreeze_at": [1, 2, 3, 4], "lr_decay": 0.5})):
        accs = [finetune(root, weights, {"strategy": strategy, "train_bn": bn, **extra}, args.epochs) for bn in (False, True)]
        print(f"{strategy:<22}{accs[0]:>16.3f}{accs[1]:>16.3f}", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
