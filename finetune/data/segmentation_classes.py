"""Class names and colours of a segmentation set: classes.yaml, classes.txt or the config."""

from __future__ import annotations

from pathlib import Path

import yaml


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """PASCAL VOC's colour map: distinct, stable for any n, background (index 0) black."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= ((c >> 0) & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


def _colour(value, name: str, source: Path) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{source}: colour of {name!r} must be [r, g, b] with values 0..255, got {value!r}")
    return tuple(value)


def _entry(item, source: Path) -> tuple[str, tuple[int, int, int] | None]:
    """A class entry is a name, or {name: ..., color: [r, g, b]}."""
    if isinstance(item, dict):
        if "name" not in item:
            raise ValueError(f"{source}: class entry {item!r} has no 'name'; write {{name: cat, color: [r, g, b]}}")
        return str(item["name"]), _colour(item.get("color", item.get("colour")), str(item["name"]), source)
    return str(item), None


def _read_classes_yaml(path: Path) -> list[tuple[str, tuple[int, int, int] | None]]:
    content = yaml.safe_load(path.read_text())
    if isinstance(content, list):
        return [_entry(item, path) for item in content]
    if isinstance(content, dict):
        # {index: name}: the indices are the mask values, so they must cover 0..N-1 exactly.
        try:
            by_index = {int(k): v for k, v in content.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{path}: a mapping must be {{index: name}} with integer indices, got keys {list(content)}") from None
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing:
            raise ValueError(f"{path}: class indices must run 0..{len(by_index) - 1} without gaps; missing {missing}")
        return [_entry(by_index[i], path) for i in range(len(by_index))]
    raise ValueError(f"{path}: expected a list of class names, a list of {{name, color}} or a mapping {{index: name}}")


def read_class_list(root: Path, class_names: list[str] | None) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Names and colours from the argument, root/classes.yaml or root/classes.txt, in that order."""
    if class_names is not None:
        entries = [(str(name), None) for name in class_names]
        source = "data.class_names"
    elif (root / "classes.yaml").is_file():
        source = root / "classes.yaml"
        entries = _read_classes_yaml(source)
    elif (root / "classes.txt").is_file():
        source = root / "classes.txt"
        entries = [(line.strip(), None) for line in source.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(
            f"data.root: {root} has no class list; add classes.yaml (a list of names, index 0 first) "
            "or classes.txt (one name per line), or pass --data.class_names [background,...]"
        )
    names = [name for name, _ in entries]
    if len(names) < 2:
        raise ValueError(f"{source}: {len(names)} class(es); a segmenter needs at least 2 (e.g. background and one more)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: class names {duplicates} appear more than once")
    palette = default_palette(len(names))
    colours = [colour or palette[i] for i, (_, colour) in enumerate(entries)]
    return names, colours
