"""Regenerate data/segmentation-sample/, a small synthetic semantic-segmentation set.

    pip install scikit-image                   # only needed to regenerate; supplies the photos
    python data/make_segmentation_sample.py    # or: --train 120 --val 30 --seed 0 --out DIR

Pastes Fashion-MNIST objects (trouser, bag, sneaker, dress) from data/fashion-mnist-sample/
onto random crops of public-domain / CC0 photographs bundled with scikit-image. Each image
gets 1-4 objects, 20-80 px long, randomly tinted and placed; later objects occlude earlier
ones in both the image and the mask. Objects for train/ come only from the classification
sample's train/ split and objects for val/ only from its val/ split.

Output layout (mask matched to image by file stem):

    segmentation-sample/
      classes.yaml                     # [{name, color}] in class-index order, 0 = background
      train/images/*.png  train/masks/*.png
      val/images/*.png    val/masks/*.png

Images are 8-bit RGB PNG in three sizes (width x height): 128x128, 160x96 and 96x160, with
values rounded to multiples of 4 to keep the PNGs small.
Masks are single-channel 8-bit PNG (mode "L"), pixel value = class index (0..4); no ignore
value is used. The output is deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

try:
    import skimage.data
except ImportError:  # pragma: no cover - only hit when regenerating without the extra
    sys.exit(
        "make_segmentation_sample.py needs scikit-image for its bundled sample photos "
        "(it is not a runtime dependency of finetune):\n    pip install scikit-image"
    )

HERE = Path(__file__).parent

# (name, colour for visualisation); index in this list = pixel value in the masks.
CLASSES = [
    ("background", (0, 0, 0)),
    ("trouser", (230, 25, 75)),
    ("bag", (60, 180, 75)),
    ("sneaker", (255, 225, 25)),
    ("dress", (0, 130, 200)),
]

# scikit-image sample photos that ship inside the wheel (no download) and whose docstrings
# state public domain or CC0; see data/SEGMENTATION_SAMPLE.md. True = colour photo.
PHOTOS = {
    "astronaut": True,  # NASA, public domain
    "coffee": True,  # Rachel Michetti, CC0
    "chelsea": True,  # Stefan van der Walt, CC0
    "rocket": True,  # SpaceX, public domain
    "brick": False,  # CC0Textures, CC0
    "grass": False,  # DeviantArt linolafett, CC0
    "gravel": False,  # CC0Textures, CC0
}

SIZES = [(128, 128), (128, 128), (160, 96), (96, 160)]  # (width, height); square twice as likely
THRESHOLD = 20  # Fashion-MNIST pixel value above which a pixel belongs to the object
MIN_LEN, MAX_LEN = 20, 80  # longer side of a pasted object, in output pixels
MAX_OBJECTS = 4
QUANT = 4  # image values are rounded to multiples of this (see make_split)


def load_photos() -> list[np.ndarray]:
    photos = []
    for name, colour in PHOTOS.items():
        a = getattr(skimage.data, name)()
        if not colour:
            a = np.repeat(a[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(a[..., :3], dtype=np.uint8))
    return photos


def clean_mask(gray: np.ndarray) -> np.ndarray:
    """Object pixels above THRESHOLD; drop specks and fill pin-holes (not e.g. a bag's handle)."""
    mask = gray > THRESHOLD
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 8)) | (labels == 1 + int(np.argmax(sizes)))
    holes, n = ndimage.label(~mask)
    for i in range(1, n + 1):
        region = holes == i
        touches_border = region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any()
        if not touches_border and region.sum() <= 6:
            mask |= region
    return mask


def load_objects(split_dir: Path) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per foreground class: list of (gray crop, mask crop) cut to the mask's bounding box."""
    objects = []
    for name, _ in CLASSES[1:]:
        files = sorted((split_dir / name).glob("*.png"))
        if not files:
            sys.exit(f"no images in {split_dir / name}")
        items = []
        for f in files:
            gray = np.asarray(Image.open(f).convert("L"))
            mask = clean_mask(gray)
            if mask.sum() < 20:
                continue
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = np.s_[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
            items.append((gray[box], mask[box]))
        objects.append(items)
    return objects


def random_background(rng: np.random.Generator, photos: list[np.ndarray], w: int, h: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    # Source pixels per output pixel; mostly upsampling, whose smoother result keeps PNGs small.
    scale = min(rng.uniform(0.4, 1.5), ph / h, pw / w)
    cw, ch = int(round(w * scale)), int(round(h * scale))
    x, y = int(rng.integers(pw - cw + 1)), int(rng.integers(ph - ch + 1))
    crop = Image.fromarray(photo[y: y + ch, x: x + cw]).resize((w, h), Image.Resampling.LANCZOS)
    bg = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    return bg


def random_tint(rng: np.random.Generator) -> np.ndarray:
    """An RGB multiplier: random hue, saturation 0.2-0.9, value 0.35-1.0."""
    hue, sat, val = rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.35, 1.0)
    i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i])


def paste(rng, image, mask, gray, obj_mask, class_index) -> None:
    """Resize, flip, tint and alpha-blend one object; overwrite image and mask in place."""
    h, w = mask.shape
    # sqrt(u) favours larger objects a little, so objects cover about a fifth of the pixels.
    length = MIN_LEN + (min(MAX_LEN, 0.9 * max(h, w)) - MIN_LEN) * np.sqrt(rng.random())
    oh, ow = gray.shape
    aspect = rng.uniform(0.85, 1.15)  # mild stretch
    s = length / max(oh, ow * aspect)
    nh, nw = max(3, int(round(oh * s))), max(3, int(round(ow * aspect * s)))
    g = np.asarray(Image.fromarray(gray).resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = np.asarray(
        Image.fromarray(obj_mask.astype(np.uint8) * 255).resize((nw, nh), Image.Resampling.BILINEAR),
        dtype=np.float32,
    ) / 255.0
    if rng.random() < 0.5:
        g, alpha = g[:, ::-1], alpha[:, ::-1]
    # Fashion-MNIST objects are grey-on-black: lift the darkest object pixels a little so
    # dark clothes stay visible, then multiply by a random colour.
    rgb = (40 + 215 * g[..., None] / 255.0) * random_tint(rng)
    # Top-left corner; up to a quarter of the object may fall outside the frame.
    y0 = int(rng.integers(-nh // 4, h - 3 * nh // 4 + 1))
    x0 = int(rng.integers(-nw // 4, w - 3 * nw // 4 + 1))
    ys, xs = slice(max(y0, 0), min(y0 + nh, h)), slice(max(x0, 0), min(x0 + nw, w))
    oys, oxs = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    a = alpha[oys, oxs]
    image[ys, xs] = a[..., None] * rgb[oys, oxs] + (1 - a[..., None]) * image[ys, xs]
    mask[ys, xs][a >= 0.5] = class_index


def make_split(rng, photos, objects, count: int, out: Path, prefix: str) -> np.ndarray:
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir(parents=True)
    pixels = np.zeros(len(CLASSES), dtype=np.int64)
    for i in range(count):
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        image = random_background(rng, photos, w, h)
        mask = np.zeros((h, w), dtype=np.uint8)
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            c = int(rng.integers(1, len(CLASSES)))
            gray, obj_mask = objects[c - 1][int(rng.integers(len(objects[c - 1])))]
            paste(rng, image, mask, gray, obj_mask, c)
        stem = f"{prefix}_{i:04d}"
        # Round to multiples of QUANT (6 significant bits per channel): invisible, but the
        # PNGs shrink by about a third, which keeps the committed folder small.
        pixels_rgb = np.clip(np.rint(image / QUANT) * QUANT, 0, 255).astype(np.uint8)
        Image.fromarray(pixels_rgb, "RGB").save(
            out / "images" / f"{stem}.png", optimize=True
        )
        Image.fromarray(mask, "L").save(out / "masks" / f"{stem}.png", optimize=True)
        pixels += np.bincount(mask.ravel(), minlength=len(CLASSES))
    return pixels


def write_classes(path: Path) -> None:
    lines = ["# Class index = position in this list = pixel value in masks/*.png; 0 is background."]
    for name, (r, g, b) in CLASSES:
        lines += [f"- name: {name}", f"  color: [{r}, {g}, {b}]"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=HERE / "fashion-mnist-sample",
                        help="classification sample with train/<class>/ and val/<class>/")
    parser.add_argument("--out", type=Path, default=HERE / "segmentation-sample")
    parser.add_argument("--train", type=int, default=120, help="images in train/")
    parser.add_argument("--val", type=int, default=30, help="images in val/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    photos = load_photos()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    write_classes(args.out / "classes.yaml")
    for split, count, offset in (("train", args.train, 0), ("val", args.val, 1)):
        # Separate streams per split, so changing --train does not change val/.
        rng = np.random.default_rng([args.seed, offset])
        objects = load_objects(args.source / split)
        pixels = make_split(rng, photos, objects, count, args.out / split, split)
        missing = [CLASSES[c][0] for c in range(1, len(CLASSES)) if pixels[c] == 0]
        if missing:
            sys.exit(f"{split}: no pixels of {missing}; use more images or another --seed")
        fractions = ", ".join(f"{n} {p / pixels.sum():.1%}" for (n, _), p in zip(CLASSES, pixels))
        print(f"{split}: {count} images -> {args.out / split} ({fractions})")


if __name__ == "__main__":
    main()
