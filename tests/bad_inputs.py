"""Every kind of bad input an image folder holds, generated: for tests, and as a script.

    python tests/bad_inputs.py OUT_DIR

writes three messy but trainable folders, OUT_DIR/{classification,segmentation,identities}
(the first with a linked class folder in OUT_DIR/classification_outside), and
OUT_DIR/fatal/<case>: folders no training can use. It prints what each file is and whether
training must load it, skip it or never list it.

Each `write_messy_*` returns a Messy: the paths (as the DataModules list them) that training
must skip (files and folders), those it must load although they are odd, and those it must
ignore (not images).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 24


@dataclass
class Messy:
    root: Path
    skipped: dict[str, str] = field(default_factory=dict)  # path -> what is wrong with it
    loaded: dict[str, str] = field(default_factory=dict)  # path -> what is odd about it
    ignored: dict[str, str] = field(default_factory=dict)  # path -> why it is no image


# --- single files ---------------------------------------------------------------------------

def good_image(path: Path, colour=(200, 40, 40), seed: int = 0, size: int = SIZE) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _png_bytes(width: int, height: int, rows: bytes = b"\0" * 64) -> bytes:
    """A grey PNG whose header claims width x height; the pixel data need not match."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated_jpeg(path: Path) -> Path:
    """A download cut short: the header is whole, most of the pixel data is missing."""
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    return path


def text_as_image(path: Path) -> Path:
    path.write_text("name,label\nthis is a CSV saved with an image extension\n")
    return path


def html_as_image(path: Path) -> Path:
    path.write_text("<!DOCTYPE html>\n<html><body>403 Forbidden: what a scraper saved as a photo</body></html>\n")
    return path


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A header that claims `width x height` pixels (100k x 100k: over twice PIL's limit)."""
    path.write_bytes(_png_bytes(width, height))
    return path


def large_png(path: Path) -> Path:
    """132 Mpx claimed: above PIL's MAX_IMAGE_PIXELS (it warns) and below twice it (it raises)."""
    return bomb_png(path, 12_000, 11_000)


def corrupt_png(path: Path) -> Path:
    """Header and end marker intact, pixel data scrambled: only decoding finds it."""
    noise = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.find(b"IDAT") + 16
    data[start:start + 40] = bytes(b ^ 0x55 for b in data[start:start + 40])
    path.write_bytes(bytes(data))
    return path


def broken_symlink(path: Path) -> Path:
    os.symlink(path.parent / "no-such-file.jpg", path)
    return path


BROKEN = {  # file name -> writer: what training must skip
    "empty.jpg": zero_byte,
    "truncated.jpg": truncated_jpeg,
    "notes.png": text_as_image,
    "page.jpg": html_as_image,
    "bomb.png": bomb_png,
    "large.png": large_png,
    "corrupt.png": corrupt_png,
    "gone.jpg": broken_symlink,
}


# --- odd but readable: must load, with these pixels -------------------------------------------

def odd_images(folder: Path) -> dict[str, tuple[Path, np.ndarray, int]]:
    """name -> (path, the HxWx3 uint8 array read_rgb must return, tolerance)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    h, w = 8, 12
    # RGBA: left half opaque red, right half fully transparent blue -> white (composited).
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[:, : w // 2] = (255, 0, 0, 255)
    rgba[:, w // 2:] = (0, 0, 255, 0)
    Image.fromarray(rgba).save(folder / "alpha.png")
    expected = np.full((h, w, 3), 255, np.uint8)
    expected[:, : w // 2] = (255, 0, 0)
    out["alpha.png"] = (folder / "alpha.png", expected, 0)
    # Palette, and palette with a transparent index.
    indices = (np.arange(h * w).reshape(h, w) % 2).astype(np.uint8)
    colours = np.array([(10, 20, 30), (200, 100, 50)], np.uint8)
    for name, transparent in (("palette.png", None), ("palette_transparent.png", 1)):
        image = Image.fromarray(indices, "L").convert("P")
        image.putpalette([c for rgb in colours.tolist() for c in rgb] + [0] * (768 - 6))
        image.putdata(indices.ravel().tolist())
        image.save(folder / name, **({"transparency": transparent} if transparent is not None else {}))
        expected = colours[indices].copy()
        if transparent is not None:
            expected[indices == transparent] = 255
        out[name] = (folder / name, expected, 0)
    # 16-bit grey: values scale to 8 bits, not clip.
    ramp = np.tile(np.linspace(0, 255, w).round().astype(np.uint16), (h, 1))
    Image.fromarray(ramp * 257).save(folder / "depth16.png")
    out["depth16.png"] = (folder / "depth16.png", np.repeat(ramp.astype(np.uint8)[..., None], 3, axis=2), 1)
    # CMYK JPEG (print workflows): pure red.
    Image.new("CMYK", (w, h), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    out["cmyk.jpg"] = (folder / "cmyk.jpg", np.full((h, w, 3), (255, 0, 0), np.uint8), 3)
    # Grayscale JPEG.
    Image.new("L", (w, h), 90).save(folder / "grey.jpg", quality=95)
    out["grey.jpg"] = (folder / "grey.jpg", np.full((h, w, 3), 90, np.uint8), 2)
    # EXIF orientation 6: stored 24x12 (WxH) with a white left half; shown turned 90 degrees
    # clockwise, 12x24, white on top.
    stored = np.zeros((12, 24, 3), np.uint8)
    stored[:, :12] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=100)
    expected = np.zeros((24, 12, 3), np.uint8)
    expected[:12] = 255
    out["exif_rotated.jpg"] = (folder / "exif_rotated.jpg", expected, 8)
    # Tiny: 3x2 pixels.
    tiny = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(tiny).save(folder / "tiny.png")
    out["tiny.png"] = (folder / "tiny.png", tiny, 0)
    return out


# --- folders --------------------------------------------------------------------------------

def _junk(root: Path, messy: Messy, class_dir: Path) -> None:
    """What file managers, zips and people leave behind: never listed as images."""
    for path, why in (
        (root / "README.txt", "stray text file in the root"),
        (root / "labels.csv", "stray CSV in the root"),
        (root / ".DS_Store", "hidden file"),
        (class_dir / ".DS_Store", "hidden file"),
        (class_dir / "._photo.jpg", "hidden AppleDouble file with an image extension"),
        (class_dir / "notes.txt", "stray text file in a class folder"),
    ):
        path.write_bytes(b"\x00\x05\x16\x07junk" if path.suffix == ".jpg" else b"junk\n")
        messy.ignored[str(path)] = why
    hidden = good_image(root / ".hidden class" / "x.png")
    messy.ignored[str(hidden)] = "image in a hidden folder"
    thumbs = good_image(class_dir / ".thumbnails" / "t.png")
    messy.ignored[str(thumbs)] = "image in a hidden sub-folder"


def write_messy_classification(root: Path, per_class: int = 6) -> Messy:
    """root/<class>/*: five classes (one a linked folder, names with a space and non-ASCII), odd
    images to load, broken files and an empty class folder to skip, junk to ignore."""
    root.mkdir(parents=True, exist_ok=True)
    messy = Messy(root)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "sea lion": (40, 40, 200), "café": (200, 200, 40)}
    for c, (name, colour) in enumerate(colours.items()):
        for i in range(per_class):
            good_image(root / name / f"{i}.png", colour, seed=c * 100 + i)
    outside = root.parent / f"{root.name}_outside"
    for i in range(per_class):
        good_image(outside / "purple" / f"{i}.png", (160, 40, 200), seed=900 + i)
    os.symlink(outside / "purple", root / "linked class")  # a class folder that is a link
    os.symlink(root / "red" / "0.png", root / "green" / "link_to_red.png")  # a link to a file
    messy.loaded[str(root / "linked class" / "0.png")] = "in a linked class folder"
    messy.loaded[str(root / "green" / "link_to_red.png")] = "link to a file"
    (root / "red" / "copy_of_0.png").write_bytes((root / "red" / "0.png").read_bytes())
    messy.loaded[str(root / "red" / "copy_of_0.png")] = "duplicate of red/0.png"
    for i, (name, (path, _, _)) in enumerate(odd_images(root / "café").items()):
        target = root / list(colours)[i % len(colours)] / f"odd_{name}"
        path.rename(target)
        messy.loaded[str(target)] = name
    for i, (name, write) in enumerate(BROKEN.items()):
        path = write(root / ["red", "green", "sea lion"][i % 3] / name)
        messy.skipped[str(path)] = name
    (root / "empty class").mkdir()
    messy.skipped[str(root / "empty class")] = "empty class folder"
    _junk(root, messy, root / "red")
    return messy


def write_mask(path: Path, height: int, width: int, seed: int = 0, values=(0, 1, 2)) -> Path:
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.array(values, np.uint8), (height, width))
    mask[0] = 255  # an ignored row, as annotation tools leave at borders
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def write_messy_segmentation(root: Path, good: int = 8) -> Messy:
    """root/{images,masks} + classes.txt: good and odd pairs to load; broken images, missing,
    RGB, empty, mis-sized and mislabelled masks to skip."""
    root.mkdir(parents=True, exist_ok=True)
    messy = Messy(root)
    images, masks = root / "images", root / "masks"
    (root / "classes.txt").write_text("background\nred\nblue\n")
    for i in range(good):
        good_image(images / f"{i}.png", (120, 120, 120), seed=i, size=32)
        write_mask(masks / f"{i}.png", 32, 32, seed=i)
    for name, (path, expected, _) in odd_images(root / "odd").items():
        target = images / f"odd_{name}"
        path.rename(target)
        write_mask(masks / f"odd_{Path(name).stem}.png", *expected.shape[:2])
        messy.loaded[str(target)] = name
    (root / "odd").rmdir()
    palette = Image.fromarray(np.random.default_rng(5).integers(0, 3, (32, 32), dtype=np.uint8)).convert("P")
    good_image(images / "palette_mask.png", seed=50, size=32)
    palette.save(masks / "palette_mask.png")
    messy.loaded[str(images / "palette_mask.png")] = "palette mask"
    for name, side in (("truncated.jpg", 96), ("corrupt.png", SIZE), ("empty.jpg", 32)):
        path = BROKEN[name](images / name)
        write_mask(masks / f"{Path(name).stem}.png", side, side)  # as big as the image claims: the image is what is wrong
        messy.skipped[str(path)] = f"image: {name}"
    good_image(images / "no_mask.png", size=32)
    messy.skipped[str(images / "no_mask.png")] = "missing mask"
    good_image(images / "rgb_mask.png", size=32)
    good_image(masks / "rgb_mask.png", size=32)
    messy.skipped[str(masks / "rgb_mask.png")] = "RGB mask"
    good_image(images / "wrong_size.png", size=32)
    write_mask(masks / "wrong_size.png", 31, 32)
    messy.skipped[str(masks / "wrong_size.png")] = "mask size differs from its image"
    good_image(images / "bad_labels.png", size=32)
    write_mask(masks / "bad_labels.png", 32, 32, values=(0, 1, 7))
    messy.skipped[str(masks / "bad_labels.png")] = "mask label 7 outside the 3 classes"
    good_image(images / "empty_mask.png", size=32)
    zero_byte(masks / "empty_mask.png")
    messy.skipped[str(masks / "empty_mask.png")] = "empty mask file"
    (images / ".DS_Store").write_bytes(b"junk")
    messy.ignored[str(images / ".DS_Store")] = "hidden file"
    return messy


def write_messy_identities(root: Path, per_identity: int = 3) -> Messy:
    """root/<identity>/*: seven usable identities (one linked, names with a space and
    non-ASCII), broken files, an empty identity and one whose only image is broken."""
    root.mkdir(parents=True, exist_ok=True)
    messy = Messy(root)
    names = ["ana", "bo", "chen", "dmitri", "ewa fox", "zoë"]
    for n, name in enumerate(names):
        for i in range(per_identity):
            good_image(root / name / f"{i}.png", tuple(int(v) for v in np.random.default_rng(n).integers(0, 256, 3)), seed=n * 10 + i)
    outside = root.parent / f"{root.name}_outside"
    for i in range(per_identity):
        good_image(outside / "linked" / f"{i}.png", (30, 90, 150), seed=700 + i)
    os.symlink(outside / "linked", root / "linked")
    messy.loaded[str(root / "linked" / "0.png")] = "in a linked identity folder"
    for name in ("empty.jpg", "truncated.jpg", "gone.jpg"):
        path = BROKEN[name](root / "ana" / name)
        messy.skipped[str(path)] = name
    (root / "nobody").mkdir()
    messy.skipped[str(root / "nobody")] = "empty identity folder"
    (root / "ghost").mkdir()
    path = BROKEN["notes.png"](root / "ghost" / "notes.png")
    messy.skipped[str(path)] = "notes.png"
    messy.skipped[str(root / "ghost")] = "identity whose only file is broken"
    return messy


def write_fatal_cases(root: Path) -> dict[str, tuple[Path, str]]:
    """case -> (folder, a regex of the error): folders a classifier cannot train on."""
    cases = {}
    (root / "empty").mkdir(parents=True)
    cases["empty"] = (root / "empty", "0 class folder")
    for name in ("a", "b"):
        (root / "no_images" / name).mkdir(parents=True)
        (root / "no_images" / name / "notes.txt").write_text("no image here\n")
    cases["no_images"] = (root / "no_images", "0 class folder")
    for i in range(4):
        good_image(root / "one_class" / "only" / f"{i}.png", seed=i)
    cases["one_class"] = (root / "one_class", "1 class folder")
    for i in range(4):
        good_image(root / "unreadable_class" / "a" / f"{i}.png", seed=i)
    (root / "unreadable_class" / "b").mkdir()
    zero_byte(root / "unreadable_class" / "b" / "empty.jpg")
    text_as_image(root / "unreadable_class" / "b" / "notes.png")
    cases["unreadable_class"] = (root / "unreadable_class", "class 'b' has no readable image")
    return cases


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for writer in (write_messy_classification, write_messy_segmentation, write_messy_identities):
        messy = writer(out / writer.__name__.removeprefix("write_messy_"))
        print(f"{messy.root}:")
        for label, paths in (("skip", messy.skipped), ("load", messy.loaded), ("ignore", messy.ignored)):
            for path, what in sorted(paths.items()):
                print(f"  {label:6s} {os.path.relpath(path, messy.root)}  ({what})")
    for folder, error in write_fatal_cases(out / "fatal").values():
        print(f"{folder}: fatal ({error})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
