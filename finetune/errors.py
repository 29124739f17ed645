"""Errors the user can fix, shown as one line that names the config key, never a traceback.

Our messages start with the key they are about (`model.backbone: ...`, `data.root: ...`,
`ckpt_path: ...`). jsonargparse wraps errors raised while it builds the model and data in
a Union report, and prints parse errors after ~100 lines of usage; `user_message` digs our
line out of the first, `condense_parse_error` shortens the second, and `lightning_refusal`
names the key of a setting Lightning refuses. `one_line_errors` is where `finetune` prints them.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import pickle
import re
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("finetune")

# The config sections whose keys our messages start with.
_KEYED = re.compile(
    r"^(model|data|trainer|checkpoint|ckpt_path|predictions|nonfinite|interruption|weights_only"
    r"|seed_everything|config)[\w.\[\]]*: "
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


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Exit with `error: <our one line>` for an error the user can fix; anything else (a bug)
    keeps its traceback. The traceback of a user error is still logged at DEBUG level."""
    try:
        yield
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        log.debug("%s", message, exc_info=True)
        sys.exit(f"error: {message}")


# ---- Lightning refusing a setting --------------------------------------------------------

_LIGHTNING = {"lightning", "lightning_utilities"}  # the packages a refusal is raised in (site-packages/lightning/...)
_PACKAGE = Path(__file__).resolve().parent


def _project_code(path: Path) -> bool:
    """finetune's code, or a user's (their own task, callback): not an installed library's."""
    libraries = {Path(sysconfig.get_path(name)).resolve() for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    return _PACKAGE in path.parents or not any(library in path.parents for library in libraries)


def lightning_refusal(err: BaseException, settings: dict[str, list[str]]) -> FinetuneError | None:
    """Lightning refusing a setting, as one line that names it, or None for anything else.

    `err` was caught around a call into Lightning (building the Trainer, Trainer.fit, ...). A
    refusal is a MisconfigurationException, ValueError or TypeError (or a missing optional
    package) raised by Lightning's code. If project code (ours, or a user's own task) is on the
    way (a task reading `trainer.estimated_stepping_batches`), the message must also name a
    setting the way Lightning names settings (`` `val_check_interval` ``, `Trainer(devices=`):
    otherwise it is that code misusing Lightning, a bug that keeps its traceback, as do errors
    raised by project code or torch. `settings`: section -> its argument names; the first one the message mentions is the
    key (`trainer.max_epochs: ...`), else the first section (`trainer: ...`)."""
    refusal = isinstance(err, (ValueError, TypeError, ModuleNotFoundError)) or any(
        kind.__name__ == "MisconfigurationException" for kind in type(err).__mro__
    )
    frames = [Path(frame.filename).resolve() for frame in traceback.extract_tb(err.__traceback__)]
    in_lightning = [bool(_LIGHTNING & set(path.parts)) for path in frames]
    if not refusal or not frames or not in_lightning[-1]:
        return None
    called = frames[in_lightning.index(True):]  # from the call into Lightning down to the raise
    through_ours = any(_project_code(path) for path in called)
    text = str(err).strip().splitlines()[0].strip() if str(err).strip() else type(err).__name__
    found = []
    for section, names in settings.items():
        for name in names:
            pattern = rf"`{name}`|\({name}=" if through_ours else rf"(?<![\w.]){re.escape(name)}(?!\w)"
            hit = re.search(pattern, text)
            if hit:
                found.append((hit.start(), f"{section}.{name}"))
    if through_ours and not found:
        return None
    key = min(found)[1] if found else next(iter(settings), "trainer")
    return FinetuneError(f"{key}: {text}")


@contextmanager
def lightning_refusals_named(settings: dict[str, list[str]]) -> Iterator[None]:
    """Around a call into Lightning: its refusal of a setting raised as FinetuneError, one line
    (lightning_refusal); every other error as it was."""
    try:
        yield
    except Exception as err:
        refusal = lightning_refusal(err, settings)
        if refusal is None:
            raise
        raise refusal from err


def _torch_file(path) -> bool:
    """Whether `path` starts as torch.save writes: a zip archive, or (legacy format) a pickle."""
    try:
        with open(path, "rb") as file:
            head = file.read(2)
    except OSError:
        return True  # torch's own error says why
    return head == b"PK" or head[:1] == b"\x80"


def unreadable_file_message(key: str, path, err: BaseException) -> str | None:
    """One line for a file torch.load(weights_only=True) refused or could not read; None otherwise."""
    text = str(err)
    if path and not _torch_file(path):  # a text file, an image, a YAML config given by mistake
        fix = "pass a checkpoint written by `finetune fit`" if key == "ckpt_path" else (
            "pass the backbone's weights as .pth/.pt/.bin/.ckpt (torch.save) or .safetensors"
        )
        return f"{key}: {path} is not a PyTorch file (torch.save writes a zip archive or a pickle); {fix}"
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
_LITERALS = re.compile(r"typing\.Literal\[(.*?)\]")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?(.*)')
_NO_FILE = re.compile(r"File does not exist: '(.*)'")


def _choices(listed: str) -> list[str]:
    return [c.strip().strip("'\"") for c in listed.split(",")]


def _not_one_of(got: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(got, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{got!r} is not one of {', '.join(choices)}{hint}"


def _only_literals(subtypes: str) -> bool:
    rest = _LITERALS.sub("", subtypes.removeprefix("Subtypes:")).replace("<class 'NoneType'>", "")
    return bool(_LITERALS.search(subtypes)) and not rest.strip("[], ")


def _readable(detail: str) -> str:
    literal = _LITERAL.fullmatch(detail)
    if literal:
        return _not_one_of(literal.group(2).strip(), _choices(literal.group(1)))
    missing = _NO_FILE.fullmatch(detail)
    if missing:
        return f"{missing.group(1)} does not exist; pass the path of a YAML config, e.g. configs/quickstart.yaml"
    return re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", detail)


def condense_parse_error(message: str) -> str:
    """jsonargparse's nested report as `key.path: what is wrong` (or the message unchanged)."""
    keys: list[tuple[int, str]] = []  # (indent, key) of the enclosing `Parser key "..."` lines
    found: list[tuple[str, str | None]] = []  # (key, what is wrong); None: not one of `choices[key]`
    choices: dict[str, list[str]] = {}  # key -> the values of all the Literals of its Union
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
        path = ".".join(k for _, k in keys)
        if line.startswith("Subtypes:") and _only_literals(line):  # `trainer.precision 13`: a Union of Literals
            choices[path] = list(dict.fromkeys(c for listed in _LITERALS.findall(line) for c in _choices(listed)))
            found.append((path, None))
        if any(line.startswith(noise) for noise in _NOISE) or (path in choices and line.startswith("Expected a")):
            continue
        found.append((path, _readable(line)))
    if not found:
        return message
    named = given is not None and bool(choices)
    lines = [
        ((f"{path}: " if path else "") + (detail or _not_one_of(given or "", choices[path])))
        for path, detail in found
    ]
    text = "; ".join(dict.fromkeys(lines))
    if given and not named and "Got value" not in message and len(given) < 60 and not given.startswith(
        ("Namespace(", "NestedArg(")
    ):
        text += f" (got {given!r})"
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse for the commands that run without LightningCLI (export, interpret, predict
    --exported): a mistake ends as one line naming the flag (`finetune export: --format: ...`)
    instead of the whole usage. `command`: the name the line starts with (default: `prog`)."""

    def __init__(self, prog: str, description: str | None = None, command: str | None = None):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.command = command or prog

    def error(self, message: str):
        raise SystemExit(f"{self.command}: {message} (see {self.prog} --help)")

