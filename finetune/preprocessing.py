"""How an image file becomes the network's input, resolved once.

From the backbone's pretrained config (timm's `resolve_data_config`: input size, mean, std,
crop fraction, interpolation) plus the user's overrides. The DataModule resolves it, the CLI
links it into the model's hyperparameters (so every checkpoint carries it), export writes it
into the file's metadata, and the Lightning-free runner reads it back from there: one source,
not three re-derivations that could drift.

No torch, timm or Lightning import at module level: `finetune predict --exported` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    """`input_size` None: images keep their own size (segmentation evaluates at full resolution),
    and `crop_pct` / `interpolation` / `resize_mode` do not apply. `min_input_size`: the smallest
    side the network takes (a segmentation network's output stride), set by the task at export.
    `resize_mode`: "crop" (timm's: the short side to input_size / crop_pct, then the centre
    crop) or "squash" (the whole image resized to input_size x input_size, aspect not kept,
    crop_pct unused: what `data.crop: whole` trains on). Files and checkpoints from before it
    existed are "crop"."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    min_input_size: int | None = None
    resize_mode: str = "crop"

    @classmethod
    def resolve(
        cls,
        backbone: str,
        image_size: int | None = None,
        mean=None,
        std=None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        full_resolution: bool = False,
        resize_mode: str = "crop",
    ) -> Preprocessing:
        """The backbone's pretrained values, each replaced by its override when one is given."""
        from finetune.backbones import data_config

        pretrained = data_config(backbone)
        common = {"mean": tuple(mean or pretrained["mean"]), "std": tuple(std or pretrained["std"])}
        if full_resolution:
            return cls(**common)
        return cls(
            **common,
            input_size=image_size or pretrained["input_size"][-1],
            crop_pct=crop_pct or pretrained["crop_pct"],
            interpolation=interpolation or pretrained["interpolation"],
            resize_mode=resize_mode,
        )

    def to_dict(self) -> dict:
        """Plain values, in timm's layout (`input_size` as [3, H, W]): hyperparameters and metadata."""
        size = None if self.input_size is None else [3, self.input_size, self.input_size]
        plain = {
            "input_size": size, "mean": list(self.mean), "std": list(self.std),
            "crop_pct": self.crop_pct, "interpolation": self.interpolation,
        }
        if self.min_input_size is not None:
            plain["min_input_size"] = self.min_input_size
        if self.input_size is not None:
            plain["resize_mode"] = self.resize_mode
        return plain

    @classmethod
    def from_dict(cls, plain: dict) -> Preprocessing:
        size = plain.get("input_size")
        return cls(
            mean=tuple(plain["mean"]), std=tuple(plain["std"]),
            input_size=None if size is None else int(size[-1]),
            crop_pct=plain.get("crop_pct"), interpolation=plain.get("interpolation"),
            min_input_size=plain.get("min_input_size"), resize_mode=plain.get("resize_mode") or "crop",
        )

    def eval_transform(self, normalize: bool = True):
        """The evaluation pipeline (albumentations): short-side resize and centre crop, or the
        whole image squashed (`resize_mode`), or nothing but the tensor conversion at full
        resolution."""
        from finetune.data.transforms import compose_to_tensor, eval_transform

        if self.input_size is None:
            return compose_to_tensor([], self.mean, self.std, normalize)
        return eval_transform(
            self.input_size, self.mean, self.std, self.crop_pct, self.interpolation, normalize, self.resize_mode
        )

    def eval_shrink(self):
        """How far JPEG decoding may reduce an image for `eval_transform` (None: full resolution)."""
        from finetune.data.transforms import eval_shrink

        return None if self.input_size is None else eval_shrink(self.input_size, self.crop_pct, self.resize_mode)
