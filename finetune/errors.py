"""Errors the user can fix, shown as one line that names the config key, never a traceback.

Our messages start with the key they are about (`model.backbone: ...`, `data.root: ...`,
`ckpt_path: ...`). jsonargparse wraps errors raised while it builds the model and data in
a Union report, and prints parse errors after ~100 lines of usage; `user_message` digs our
line out of the first, `condense_parse_error` shortens the second.
"""

from __future__ import annotations

import difflib
import pickle
import re

# The config sections whose keys our messages start with.
_KEYED = re.compile(
    r"^(model|data|trainer|checkpoint|ckpt_path|predictions|embeddings|nonfinite|weights_only|seed_everything)"
    r"[\w.\[\]]*: "
)


class FinetuneError(Exception):
    """An error whose message is complete for the user: `finetune` prints it without a traceback."""


class UnsafeFileError(FinetuneError, ValueError):
    """A weights file or checkpoint that holds pickled code or objects, or is not readable."""


def user_message(exc: BaseException) -> str | None:
    """Our one-line message inside `exc` (itself, what it was raised from, or a line of a
    jsonargparse Union report), or None for anything else: a bug keeps its traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if isinstance(current, FinetuneError) or _KEYED.match(text):
            return text
        # `raise ... from err` (jsonargparse's wrappers); not __context__: a bug raised while
        # handling one of ours keeps its traceback.
        current = current.__cause__
    for line in str(exc).splitlines():  # "Errors:\n  - data.root: ... is not a folder ..."
        line = line.strip().removeprefix("- ")
        if _KEYED.match(line):
            return line
    return None


def unreadable_file_message(key: str, path, err: BaseException) -> str | None:
    """One line for a file torch.load(weights_only=True) refused or could not read; None otherwise."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        fix = (
            "use a checkpoint written by `finetune fit`" if key == "ckpt_path"
            else "re-save it with torch.save(model.state_dict(), path) or as .safetensors"
        )
        return (
            f"{key}: {path} holds pickled Python objects{what}, not only tensors and plain values; it was "
            f"refused (weights_only=True) and nothing in it ran: {fix}"
        )
    if "PytorchStreamReader" in text or isinstance(err, (EOFError, OSError)):
        return f"{key}: {path} is not a readable PyTorch file (truncated or another format): {text.splitlines()[0]}"
    return None


# ---- parse errors -------------------------------------------------------------------------

_NOISE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
    "Given value:", "Expected a <class 'NoneType'>", "Problem with given class_path",
)
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?(.*)')


def _readable(detail: str) -> str:
    literal = _LITERAL.fullmatch(detail)
    if literal:
        choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
        got = literal.group(2).strip()
        close = difflib.get_close_matches(got, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{got!r} is not one of {', '.join(choices)}{hint}"
    return re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", detail)


def condense_parse_error(message: str) -> str:
    """jsonargparse's nested report as `key.path: what is wrong` (or the message unchanged)."""
    keys: list[tuple[int, str]] = []  # (indent, key) of the enclosing `Parser key "..."` lines
    found: list[str] = []
    given = None
    for raw in message.splitlines():
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip().removeprefix("- ").strip()
        if not line:
            continue
        keys = [(i, k) for i, k in keys if i < indent]
        parser_key = _PARSER_KEY.match(line)
        if parser_key:
            keys.append((indent, parser_key.group(1)))
            line = parser_key.group(2).strip()
            if not line:
                continue
        if line.startswith("Given value:") and given is None:
            given = line.removeprefix("Given value:").strip()
        if any(line.startswith(noise) for noise in _NOISE):
            continue
        path = ".".join(k for _, k in keys)
        found.append(f"{path}: {_readable(line)}" if path else _readable(line))
    if not found:
        return message
    text = "; ".join(dict.fromkeys(found))
    if given and "Got value" not in message and len(given) < 60 and not given.startswith(("Namespace(", "NestedArg(")):
        text += f" (got {given!r})"
    return text
