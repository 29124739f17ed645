"""Training augmentation policies beyond crop and flip: torchvision's RandAugment,
TrivialAugmentWide and AutoAugment (ImageNet policy), and timm-style random erasing.

albumentations 2.0 has none of the three policies, so torchvision.transforms.v2 runs them, on
the uint8 CHW tensor that ends our albumentations pipelines (ToPlanarTensor), as one more step
of the same A.Compose (`TorchvisionStep`). Being a step of the Compose keeps what the rest of
the input pipeline relies on:

- crop first (finetune/data/crop_first.py) still applies: the Compose still starts with
  RandomResizedCrop, and the policy is one of the steps `CropFirst.finish` runs after the crop;
- the augmentation stays a function of (seed, epoch, index): torchvision draws from torch's
  global generator, so each image's policy runs on that generator seeded with a number drawn
  from the Compose's Python generator, which `seeded_index` (finetune/data/sampling.py) has
  just seeded for this sample; the generator's state is restored afterwards, so loading in
  the main process (num_workers=0) does not move the training's own random stream.
"""

from __future__ import annotations

from typing import Any

import torch
from albumentations.core.transforms_interface import BasicTransform
from albumentations.core.type_definitions import Targets
from torchvision.transforms import v2

_BILINEAR = v2.InterpolationMode.BILINEAR


def mean_fill(mean: tuple[float, ...]) -> list[int]:
    """The dataset's mean colour in uint8: 0 after normalisation (timm fills with it too)."""
    return [round(255 * m) for m in mean]


def policy_steps(
    augment: str, mean: tuple[float, ...], ops: int = 2, magnitude: int = 9, random_erasing: float = 0.0
) -> list[v2.Transform]:
    """The torchvision transforms `augment` and `random_erasing` add after crop and flip ([] for
    "light" without erasing). `ops` and `magnitude` are RandAugment's (the others have fixed
    strengths). Pixels that geometric ops uncover, and erased boxes, get the mean colour."""
    fill = mean_fill(mean)
    policies = {
        "light": lambda: [],
        "randaugment": lambda: [v2.RandAugment(ops, magnitude, interpolation=_BILINEAR, fill=fill)],
        "trivialaugment": lambda: [v2.TrivialAugmentWide(interpolation=_BILINEAR, fill=fill)],
        "autoaugment": lambda: [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=_BILINEAR, fill=fill)],
    }
    if augment not in policies:
        raise ValueError(f"data.augment: {augment!r} is not one of {', '.join(policies)}")
    steps = policies[augment]()
    if random_erasing > 0:
        # timm's "const" mode, one box; scale and ratio are torchvision's defaults, timm's too.
        steps.append(v2.RandomErasing(random_erasing, value=fill))
    return steps


class TorchvisionStep(BasicTransform):
    """torchvision v2 `transforms` (applied in order) as a step of an A.Compose, after the
    tensor conversion: CHW uint8 tensor in, CHW uint8 tensor out. Seeded from the Compose's
    generators, with torch's global generator left as it was (module docstring)."""

    _targets = (Targets.IMAGE,)

    def __init__(self, transforms: list[v2.Transform], p: float = 1.0):
        super().__init__(p=p)
        self.transform = v2.Compose(transforms)

    @property
    def targets(self) -> dict[str, Any]:
        return {"image": self.apply}

    def get_params(self) -> dict[str, Any]:
        return {"torch_seed": self.py_random.getrandbits(63)}

    def apply(self, img: torch.Tensor, torch_seed: int = 0, **params) -> torch.Tensor:
        # torch.manual_seed would reseed CUDA's generators as well, which fork_rng(devices=[])
        # does not restore: seed only the CPU generator that torchvision draws from.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(torch_seed)
            return self.transform(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("transform",)
