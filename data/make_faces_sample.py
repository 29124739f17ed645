"""Regenerate data/faces-sample/, a small synthetic stand-in for a face-identity data set.

    python data/make_faces_sample.py    # defaults: --seed 0 --fonts /usr/share/fonts/truetype/dejavu
    python data/make_faces_sample.py --out /tmp/faces --train-ids 100 --val-ids 30
    python data/make_faces_sample.py --out /tmp/faces-hard --hard --train-images 8   # the original, harder set

No face data set can be installed offline, so each "identity" here is one character (a glyph),
and each "photo" of it is the glyph rendered in a random font, size, rotation, shear/perspective,
position, colours, background, blur and occluder. Images of one identity differ enough that
nearest neighbour on raw pixels does poorly, while a CNN learns the identity from random init
within the CPU quickstart, so an embedding trained with a margin head (ArcFace, CosFace) has
something to learn. Validation identities are held out from training (open-set verification,
as on LFW).

How much images vary is set by the options of the "variation" group (see `Variation`). The
defaults are the quickstart set: 4 upright DejaVu fonts, dark glyphs on lighter backgrounds,
solid glyphs, mild rotation and shear. `--hard` gives the original set: all 21 DejaVu text
fonts, either polarity, outline and shadow styles, more rotation, shear, occluders and blur
(with `--train-images 8` it reproduces that set byte for byte); single options override either.

Output layout (see data/FACES_SAMPLE.md):

    faces-sample/
      train/<identity>/<identity>_0001.png ...   # training identities, --train-images each
      val/<identity>/<identity>_0001.png ...     # different, held-out identities, --val-images each
      val_pairs.txt                              # LFW pairs.txt format over the val identities

Images are 64x64 8-bit RGB PNG. Three training identities get a single image (a code path that
real face sets have). The output is deterministic for a given --seed, variation options, font
folder and Pillow/FreeType version. Needs only numpy and Pillow.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).parent
DEFAULT_FONTS = "/usr/share/fonts/truetype/dejavu"

# The identities, one character each (130). Chosen so that no two are the same shape once size,
# rotation and horizontal flips (the identity DataModule flips by default) are random:
# - dropped cross-script twins (Latin A / Greek Alpha / Cyrillic A, Y / Cyrillic Ue, Greek Theta /
#   Cyrillic Fita, Armenian Oh / O, Armenian Seh / U, Armenian ho / h, ...);
# - dropped O/0, I/l/1 (kept 1), and lower case that is a scaled upper case
#   (c o p s u v w x z; Cyrillic lower case, which is mostly small capitals);
# - dropped mirror pairs: d (b), q (p ~ P), Cyrillic I (N), Ya (R), E (C), Greek epsilon (3);
# - dropped glyphs that differ only by a small mark: j (J), stroked/accented letters, Ð, Ø, Ł, Ħ.
# Latin, digits, Greek and Cyrillic alone leave too few distinct shapes for 130 identities, so
# Georgian (Mkhedruli) and Armenian letters fill up, again without their lookalikes
# (e.g. Georgian vin ~ 8, Armenian oh ~ O). Every DejaVu text font renders all of them.
CHARACTERS = (
    "ABCDEFGHJKLMNOPQRSTUVWXYZ"  # Latin capitals (no I)
    "abefghikmnrty"  # Latin small letters that are not scaled capitals or mirror images
    "123456789"  # digits (no 0)
    "ΔΞΠΣΦΨΩφ"  # Greek capitals unlike Latin ones, and small phi
    "αβδηθλμξσω"  # Greek small letters
    "ДЖЛЦЧШЩЪЫЮЉЊЂҤ"  # Cyrillic capitals unlike Latin and Greek ones
    "ÆæŒßÞĲĳʣʦʧ"  # Latin ligatures and extra letters
    "აბგდთიკლჟრტფქშჭჯჰ"  # Georgian
    "ԲԳԶԹԺԽԾԿՀՁՂՃՄՇՉՊՌՎՒՔՖ"  # Armenian capitals
    "էըջ"  # Armenian small letters whose capitals look like other identities
)

SS = 4  # supersampling factor for the glyph layer
QUANT = 8  # pixel values are rounded to multiples of this (keeps the PNGs small)


@dataclass(frozen=True)
class Variation:
    """How much two images of one identity differ. The defaults make the quickstart set
    (learnable from random init in a few CPU minutes); HARD is the original, much harder set."""

    fonts: tuple[str, ...] = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Bold")  # file stems; () = all
    styles: tuple[str, ...] = ("solid",)  # drawn uniformly (repeat one to weight it): solid, outline, shadow
    polarity: str = "dark"  # glyph darker than the background ("dark"), lighter ("light"), or either ("both")
    rotation: float = 10.0  # degrees, +-
    shear: tuple[float, float] = (0.1, 0.05)  # horizontal, vertical, +-
    stretch: float = 0.15  # aspect x e^+-stretch
    tilt: float = 0.2  # perspective, +-
    fill: tuple[float, float] = (0.45, 0.85)  # the glyph's longer side, fraction of the frame
    shift: float = 0.12  # offset, fraction of the frame, +- (size and position: cheap for a CNN, hard for pixels)
    noise: float = 14.0  # low-frequency background noise amplitude, up to
    grain: float = 0.0  # probability of fine grain (sigma 2-4)
    occluder: float = 0.1  # probability of a line or blob across the image
    blur: float = 0.15  # probability of Gaussian blur (sigma 0.4-1.0)
    lowres: float = 0.05  # probability of down- and up-sampling through 1/3-1/2 of the size


HARD = Variation(
    fonts=(), styles=("solid", "solid", "solid", "solid", "outline", "shadow"), polarity="both", rotation=20.0,
    shear=(0.25, 0.1), stretch=0.25, tilt=0.35, fill=(0.5, 0.85), shift=0.09, grain=0.2, occluder=0.25, blur=0.25,
    lowres=0.1,
)


def identity_name(ch: str) -> str:
    """Filesystem-safe name from the Unicode name: 'GREEK SMALL LETTER ALPHA' -> 'greek_small_alpha'."""
    name = unicodedata.name(ch).lower().replace(" letter ", " ")
    return name.replace(" ", "_").replace("-", "_")


def find_fonts(folder: Path) -> list[Path]:
    """The TrueType fonts in `folder` (recursively), without the math font, whose glyph set differs."""
    fonts = sorted(p for p in folder.rglob("*.ttf") if "math" not in p.name.lower())
    if not fonts:
        sys.exit(
            f"make_faces_sample.py: no .ttf fonts found under {folder}. Install the DejaVu fonts "
            "(Debian/Ubuntu: apt-get install fonts-dejavu-core fonts-dejavu-extra) or pass --fonts DIR."
        )
    return fonts


def fonts_for_each_character(font_paths: list[Path], chars: str) -> dict[str, list[Path]]:
    """Which fonts render each character (a missing glyph renders like the .notdef box)."""
    covering: dict[str, list[Path]] = {ch: [] for ch in chars}
    for path in font_paths:
        font = ImageFont.truetype(str(path), 48)
        notdef = bytes(font.getmask("\ue000"))  # private-use code point: no DejaVu glyph
        for ch in chars:
            if bytes(font.getmask(ch)) != notdef:
                covering[ch].append(path)
    missing = [ch for ch, paths in covering.items() if not paths]
    if missing:
        sys.exit(f"make_faces_sample.py: no font in the font folder renders {' '.join(missing)}")
    return covering


# ----------------------------------------------------------------------------- colours


def luminance(rgb: np.ndarray) -> float:
    return float(rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114)


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """Random HSV colour: any hue, often desaturated, any brightness."""
    h, s, v = rng.random(), rng.random() ** 1.5, rng.uniform(0.05, 1.0)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([r, g, b]) * 255


def colour_scheme(rng: np.random.Generator, polarity: str = "both", min_contrast: float = 75.0):
    """Two background colours and one or two foreground colours, every fg/bg pair at least
    `min_contrast` apart in luminance (0-255), so the glyph stays legible everywhere.
    `polarity`: "dark" (glyph darker than the background), "light" (lighter) or "both"."""
    sign = {"dark": -1.0, "light": 1.0, "both": None}[polarity]
    while True:
        bg1 = random_colour(rng)
        bg2 = np.clip(bg1 + rng.normal(0, 45, 3), 0, 255) if rng.random() < 0.7 else bg1
        fg1 = random_colour(rng)
        fg2 = np.clip(fg1 + rng.normal(0, 40, 3), 0, 255) if rng.random() < 0.25 else fg1
        gaps = [luminance(f) - luminance(b) for f in (fg1, fg2) for b in (bg1, bg2)]
        if all((abs(g) if sign is None else sign * g) >= min_contrast for g in gaps):
            return bg1, bg2, fg1, fg2


def gradient(rng: np.random.Generator, size: int, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """HxWx3 float image going from c1 to c2, linearly along a random direction or radially."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    if rng.random() < 0.7:
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a)) / math.sqrt(0.5) + 0.5
    else:
        cx, cy = rng.uniform(-0.4, 0.4, 2)
        t = np.hypot(xx - cx, yy - cy) / 0.9
    t = np.clip(t, 0, 1)[..., None]
    return c1 * (1 - t) + c2 * t


def smooth_noise(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Low-frequency colour noise: a coarse random grid, upsampled bicubically."""
    cells = int(rng.integers(3, 9))
    grid = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
    chans = [np.asarray(Image.fromarray(grid[..., c], "F").resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.stack(chans, axis=-1) * amplitude


def background(rng: np.random.Generator, size: int, bg1: np.ndarray, bg2: np.ndarray, v: Variation) -> np.ndarray:
    img = gradient(rng, size, bg1, bg2)
    img = img + smooth_noise(rng, size, rng.uniform(0, v.noise))
    if rng.random() < v.grain:  # fine grain (sparingly: it makes PNGs much larger)
        img = img + rng.normal(0, rng.uniform(2, 4), (size, size, 1))
    return img


# ----------------------------------------------------------------------------- glyph layer


def glyph_mask(ch: str, font_path: Path, style: str, rng: np.random.Generator) -> Image.Image:
    """Tight-cropped 8-bit coverage mask of the glyph at 160 px (only its outline for 'outline')."""
    font = ImageFont.truetype(str(font_path), 160)
    canvas = Image.new("L", (420, 420))
    draw = ImageDraw.Draw(canvas)
    if style == "outline":
        width = int(rng.integers(5, 10))
        draw.text((210, 210), ch, font=font, fill=0, anchor="mm", stroke_width=width, stroke_fill=255)
    else:
        draw.text((210, 210), ch, font=font, fill=255, anchor="mm")
    return canvas.crop(canvas.getbbox())


def warp(mask: Image.Image, rng: np.random.Generator, v: Variation) -> Image.Image:
    """Rotate, shear, stretch and tilt (mild perspective) a glyph mask; re-cropped."""
    w, h = mask.size
    pad = max(w, h)
    big = Image.new("L", (w + 2 * pad, h + 2 * pad))
    big.paste(mask, (pad, pad))
    cx, cy = big.size[0] / 2, big.size[1] / 2
    a = math.radians(rng.uniform(-v.rotation, v.rotation))
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    (sx, sy) = v.shear
    shear = np.array([[1, rng.uniform(-sx, sx), 0], [rng.uniform(-sy, sy), 1, 0], [0, 0, 1]])
    stretch = math.exp(rng.uniform(-v.stretch, v.stretch))
    scale = np.diag([stretch, 1 / stretch, 1])
    tilt = np.array([[1, 0, 0], [0, 1, 0], [*(rng.uniform(-v.tilt, v.tilt, 2) / max(w, h)), 1]])
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
    forward = back @ tilt @ rot @ shear @ scale @ to_centre  # output <- input
    inv = np.linalg.inv(forward)
    inv = inv / inv[2, 2]
    out = big.transform(big.size, Image.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.BICUBIC)
    return out.crop(out.getbbox())


def place(mask: Image.Image, size: int, fill: float, shift: float, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the mask so its longer side is `fill` of the frame; random offset, kept inside the frame."""
    w, h = mask.size
    s = fill * size / max(w, h)
    mask = mask.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    w, h = mask.size
    max_shift = shift * size
    dx = rng.uniform(-1, 1) * min(max_shift, (size - w) / 2)
    dy = rng.uniform(-1, 1) * min(max_shift, (size - h) / 2)
    return mask, (round((size - w) / 2 + dx), round((size - h) / 2 + dy))


def render(ch: str, fonts: list[Path], size: int, rng: np.random.Generator, v: Variation = Variation()) -> Image.Image:
    font = fonts[int(rng.integers(len(fonts)))]
    style = v.styles[int(rng.integers(len(v.styles)))]
    bg1, bg2, fg1, fg2 = colour_scheme(rng, v.polarity)
    img = background(rng, size, bg1, bg2, v)

    big = size * SS
    mask, (x, y) = place(warp(glyph_mask(ch, font, style, rng), rng, v), big, rng.uniform(*v.fill), v.shift, rng)
    layer = Image.new("L", (big, big))
    layer.paste(mask, (x, y))
    if style == "shadow":  # offset copy in a colour between background and foreground, under the glyph
        shadow = Image.new("L", (big, big))
        off = rng.integers(1, 3, 2) * SS * rng.choice([-1, 1], 2)
        shadow.paste(mask, (x + int(off[0]), y + int(off[1])))
        alpha = np.asarray(shadow.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255
        shade = bg1 + (fg1 - bg1) * rng.uniform(0.35, 0.6)
        img = img * (1 - alpha) + shade * alpha
    alpha = np.asarray(layer.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255
    img = img * (1 - alpha) + gradient(rng, size, fg1, fg2) * alpha

    if rng.random() < v.occluder:  # occluder: a line across the frame or a blob, in a random colour
        occ = Image.new("L", (big, big))
        draw = ImageDraw.Draw(occ)
        if rng.random() < 0.6:
            p = rng.uniform(0, big, 4)
            draw.line([(p[0], 0), (p[1], big)] if rng.random() < 0.5 else [(0, p[2]), (big, p[3])],
                      fill=255, width=int(rng.integers(2, 5)) * SS)
        else:
            cx, cy = rng.uniform(0.1, 0.9, 2) * big
            rx, ry = rng.uniform(0.06, 0.16, 2) * big
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        alpha = np.asarray(occ.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255
        img = img * (1 - alpha) + random_colour(rng) * alpha

    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    r = rng.random()
    if r < v.blur:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    elif r < v.blur + v.lowres:  # low resolution look
        low = int(rng.integers(size // 3, size // 2 + 1))
        out = out.resize((low, low), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    q = np.clip(np.round(np.asarray(out, dtype=np.float64) / QUANT) * QUANT, 0, 255).astype(np.uint8)
    return Image.fromarray(q, "RGB")


# ----------------------------------------------------------------------------- splits and pairs


def write_identity(
    folder: Path, name: str, ch: str, n: int, fonts: list[Path], size: int, seed: list[int], v: Variation
) -> None:
    (folder / name).mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(seed + [i])  # one stream per image: independent of write order
        render(ch, fonts, size, rng, v).save(folder / name / f"{name}_{i + 1:04d}.png", optimize=True)


def lfw_pairs(counts: dict[str, int], folds: int, per_fold: int, rng: np.random.Generator) -> list[str]:
    """LFW pairs.txt lines. Identities are dealt to folds so that no identity is in two folds (as in
    LFW's View 2); each fold gets `per_fold` matched pairs (within an identity with >= 2 images) and
    `per_fold` mismatched pairs (between two identities of the fold), all distinct."""
    names = sorted(counts)
    order = [names[i] for i in rng.permutation(len(names))]
    lines = [f"{folds}\t{per_fold}"]
    for f in range(folds):
        members = sorted(order[f::folds])
        same = [(n, i, j) for n in members for i in range(1, counts[n] + 1) for j in range(i + 1, counts[n] + 1)]
        diff = [(a, i, b, j) for x, a in enumerate(members) for b in members[x + 1:]
                for i in range(1, counts[a] + 1) for j in range(1, counts[b] + 1)]
        if len(same) < per_fold or len(diff) < per_fold:
            sys.exit(
                f"make_faces_sample.py: fold {f + 1} has {len(members)} identities, giving {len(same)} matched and "
                f"{len(diff)} mismatched pairs; need {per_fold} of each (lower --pairs-per-fold or --folds)"
            )
        pick_same = sorted(same[k] for k in rng.choice(len(same), per_fold, replace=False))
        pick_diff = sorted(diff[k] for k in rng.choice(len(diff), per_fold, replace=False))
        lines += [f"{n}\t{i}\t{j}" for n, i, j in pick_same]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in pick_diff]
    return lines


def select_fonts(fonts: list[Path], names: tuple[str, ...]) -> list[Path]:
    """The fonts whose file stem is in `names` (all of them for an empty `names`)."""
    if not names:
        return fonts
    by_stem = {p.stem: p for p in fonts}
    missing = [n for n in names if n not in by_stem]
    if missing:
        sys.exit(f"make_faces_sample.py: font(s) {', '.join(missing)} not in the font folder (have {', '.join(sorted(by_stem))})")
    return [by_stem[n] for n in names]


def variation_from_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Variation:
    v = HARD if args.hard else Variation()
    changes = {}
    if args.font_names is not None:
        changes["fonts"] = () if args.font_names == "all" else tuple(n.strip() for n in args.font_names.split(",") if n.strip())
    if args.styles is not None:
        changes["styles"] = tuple(n.strip() for n in args.styles.split(",") if n.strip())
        if not changes["styles"] or set(changes["styles"]) - {"solid", "outline", "shadow"}:
            ap.error("--styles: give one or more of solid, outline, shadow")
    for key in ("polarity", "rotation", "stretch", "tilt", "shift", "noise", "grain", "occluder", "blur", "lowres"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    for key in ("shear", "fill"):
        if getattr(args, key) is not None:
            changes[key] = tuple(getattr(args, key))
    v = dataclasses.replace(v, **changes)
    if not 0 < v.fill[0] <= v.fill[1] <= 1 or v.blur + v.lowres > 1:
        ap.error("need 0 < --fill MIN <= MAX <= 1 and --blur + --lowres <= 1")
    return v


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "faces-sample", help="output folder (deleted and rewritten)")
    ap.add_argument("--fonts", type=Path, default=Path(DEFAULT_FONTS), help="folder with the DejaVu .ttf files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-ids", type=int, default=100, help="training identities")
    ap.add_argument("--val-ids", type=int, default=30, help=f"held-out identities (train + val <= {len(CHARACTERS)})")
    ap.add_argument("--train-images", type=int, default=20, help="images per training identity")
    ap.add_argument("--val-images", type=int, default=6, help="images per validation identity")
    ap.add_argument("--singles", type=int, default=3, help="training identities that get a single image")
    ap.add_argument("--folds", type=int, default=10, help="folds in val_pairs.txt")
    ap.add_argument("--pairs-per-fold", type=int, default=30, help="matched (and as many mismatched) pairs per fold")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    var = ap.add_argument_group(
        "variation", "how much images of one identity differ; unset options come from the default (quickstart) "
        "settings, or from the original hard set with --hard"
    )
    var.add_argument("--hard", action="store_true", help="the original hard set: all 21 fonts, both polarities, "
                     "outline and shadow styles, rotation 20, more shear, occluders and degradation")
    var.add_argument("--font-names", help="comma-separated font file stems (DejaVuSans,DejaVuSerif-Bold,...) or 'all'")
    var.add_argument("--styles", help="comma-separated styles drawn uniformly (repeat to weight): solid, outline, shadow")
    var.add_argument("--polarity", choices=("dark", "light", "both"), help="glyph darker or lighter than the background, or either")
    var.add_argument("--rotation", type=float, help="max rotation in degrees")
    var.add_argument("--shear", type=float, nargs=2, metavar=("X", "Y"), help="max horizontal and vertical shear")
    var.add_argument("--stretch", type=float, help="max log aspect stretch")
    var.add_argument("--tilt", type=float, help="max perspective tilt")
    var.add_argument("--fill", type=float, nargs=2, metavar=("MIN", "MAX"), help="glyph's longer side, fraction of the frame")
    var.add_argument("--shift", type=float, help="max offset, fraction of the frame")
    var.add_argument("--noise", type=float, help="max amplitude of the low-frequency background noise")
    var.add_argument("--grain", type=float, help="probability of fine grain")
    var.add_argument("--occluder", type=float, help="probability of an occluding line or blob")
    var.add_argument("--blur", type=float, help="probability of Gaussian blur")
    var.add_argument("--lowres", type=float, help="probability of a low-resolution look")
    args = ap.parse_args(argv)
    variation = variation_from_args(args, ap)

    if args.train_ids + args.val_ids > len(CHARACTERS):
        ap.error(f"--train-ids + --val-ids must be at most {len(CHARACTERS)}")
    if args.val_ids < args.folds or args.val_images < 2 or args.singles > args.train_ids:
        ap.error("need --val-ids >= --folds, --val-images >= 2 and --singles <= --train-ids")
    if not args.fonts.is_dir():
        sys.exit(f"make_faces_sample.py: --fonts {args.fonts} is not a folder (expected the DejaVu .ttf files)")
    names = {identity_name(ch): ch for ch in CHARACTERS}
    assert len(names) == len(CHARACTERS) == len(set(CHARACTERS)), "identity names must be unique"
    covering = fonts_for_each_character(select_fonts(find_fonts(args.fonts), variation.fonts), CHARACTERS)

    rng = np.random.default_rng(args.seed)
    chars = [CHARACTERS[i] for i in rng.permutation(len(CHARACTERS))]
    val_chars = chars[: args.val_ids]
    train_chars = chars[args.val_ids : args.val_ids + args.train_ids]
    singles = set(rng.choice(len(train_chars), args.singles, replace=False).tolist())

    if args.out.exists():
        unexpected = sorted(p.name for p in args.out.iterdir() if p.name not in ("train", "val", "val_pairs.txt"))
        if unexpected:
            sys.exit(f"make_faces_sample.py: --out {args.out} holds {', '.join(unexpected[:5])}, not a faces sample; not deleting it")
        shutil.rmtree(args.out)
    counts = {"train": {}, "val": {}}
    for split, split_chars in (("train", train_chars), ("val", val_chars)):
        for k, ch in enumerate(split_chars):
            n = args.val_images if split == "val" else (1 if k in singles else args.train_images)
            name = identity_name(ch)
            write_identity(args.out / split, name, ch, n, covering[ch], args.size, [args.seed, ord(ch)], variation)
            counts[split][name] = n
    lines = lfw_pairs(counts["val"], args.folds, args.pairs_per_fold, np.random.default_rng([args.seed, 1]))
    (args.out / "val_pairs.txt").write_text("\n".join(lines) + "\n")

    for split in ("train", "val"):
        c = counts[split]
        print(f"{split}: {len(c)} identities, {sum(c.values())} images, {sum(v == 1 for v in c.values())} with one image")
    print(f"val_pairs.txt: {args.folds} folds x ({args.pairs_per_fold} matched + {args.pairs_per_fold} mismatched)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
