"""What screening found about each file (finetune.data.screening), kept on disk: found by one
process, reused by every other process of the run and by later runs.

What is kept, and why per file: for each file, its stat signature (size, mtime, ctime, inode)
and what its header said (height, width, mode, problem), and once it was read in full, what
that found (content hash, mask values, problem). A file whose signature is unchanged is not
opened again; one added, touched or replaced is screened; one removed is no longer asked for.
So a changed folder costs what changed, not a new screening of everything, and the facts do
not depend on a DataModule's settings: `finetune check-data` (every pixel) fills the cache a
training run (headers, or every pixel of a small set) then reads, and a new `val_fraction`,
`seed` or `image_size` re-screens nothing. The split is then made from these facts by the
DataModule's own code, so it is the split an uncached build makes. Listing is not cached:
proving a cached listing still true costs about what listing costs (a stat of every file and
folder), and listing is the cheap part (a readdir per folder against an open, a header read and
a read of the end of every file: 0.06 s against 0.3 s for 10k tiny PNGs on a local disk, more
apart for real images and network file systems); instead every process's result is checked
against the screening process's (below). Files with a problem are screened again on every build: a read error may
have been passing, and there are few of them.

Where: `<cache root>/screening/<hash of the source>.facts.json.gz` (columns of JSON, gzip: at 1M
files ~13 MB, ~1.5 s to read, ~2 s to write), beside `.runs.json` (who screened, below) and `.lock`.
The cache root is `$FINETUNE_CACHE`, else ~/.cache/finetune, as for finetune.data.hf_dataset's
images. `FINETUNE_SCREENING_CACHE=0` turns it off (every process screens, as without it).

Who screens. Every process builds the DataModule. Local rank 0 (LOCAL_RANK / SLURM_LOCALID
unset or 0: one process, or the first of each machine) screens, under a file lock so that runs
on the same data take turns and the later ones find the work done, and writes the facts, then a
record: its config, the digest of its result (splits and skipped files), and the process
tokens (pid + start time) of itself and of its parent. Every other local rank waits for a
record that names its own parent (Lightning's launcher started it from rank 0; torchrun, srun
or mpirun started it beside rank 0), reads rank 0's facts without opening a file, makes its
split, and checks its digest against rank 0's: a process that lists other files (a read error
in a listing, a folder changing under the run) stops with one line instead of training on
other splits. A corrupt or foreign cache file counts as a miss (one log line) and is rewritten.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock  # a dependency of torch

from finetune import __version__
from finetune.data.inspection import FileFacts
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

ROOT_ENV = "FINETUNE_CACHE"
SWITCH_ENV = "FINETUNE_SCREENING_CACHE"
WAIT_ENV = "FINETUNE_SCREENING_WAIT"
DEFAULT_WAIT_S = 600.0
POLL_S = 0.2
FORMAT = "finetune-screening/1"
KEEP_BUILDS = 16  # a file not asked for in this many writes is forgotten (removed from the set)
KEEP_RUNS = 64  # run records kept: runs on the same data may overlap
# A file changed this recently (its ctime, which every change sets to the clock's coarse "now")
# could change again within the same clock tick without changing its signature: such a file is
# screened, and screened again next time (as git treats "racily clean" files). Seconds: file
# systems with 1 s timestamps exist (ext3, HFS+, some network and FUSE ones).
RACY_S = 2.0
COLUMNS = ("path", "size", "mtime_ns", "ctime_ns", "inode", "height", "width", "mode", "problem", "decoded", "seen")
SIG, HEIGHT, WIDTH, MODE, PROBLEM, DECODED, SEEN = slice(0, 4), 4, 5, 6, 7, 8, 9  # an entry: COLUMNS[1:]


def cache_root() -> Path:
    """`$FINETUNE_CACHE`, or ~/.cache/finetune: every cache of finetune's is under it (`screening/`, `hf-images/`)."""
    root = os.environ.get(ROOT_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "finetune"


def cache_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def local_rank() -> int:
    """This process's rank on its machine, as the launcher set it before torch.distributed starts."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):  # Lightning's launcher and torchrun; srun
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def process_token(pid: int) -> str:
    """A process, unmistakably: pid and start time (Linux); a pid is reused, the pair is not."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def config_key(*parts) -> str:
    """What a DataModule build was asked: its class and settings (repr: deterministic for them)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def outcome_digest(splits, records: dict) -> str:
    """The result of a build that processes must agree on: every split's items, the class names,
    the files left out and why."""
    text = repr((splits.train, splits.val, splits.test, splits.class_names, splits.val_names, sorted(records.items())))
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


@contextmanager
def _without_gc():
    """Python's cycle collector off while a million small lists are made: they hold no cycles,
    and its passes over them would triple the time to read the cache."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _signature(path: str) -> list | None:
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]


class SharedScreening:
    """One DataModule build's use of the cache of its source: the facts Screening asks for.

    `leader`: screens what the cache lacks (or everything, `refresh`) and writes it at `close`;
    else a follower, which takes local rank 0's facts and screens nothing.
    """

    def __init__(self, source: str, folder: Path, config: str, leader: bool, refresh: bool = False):
        self.source, self.config, self.leader, self.refresh = source, config, leader, refresh
        path = Path(source).expanduser()
        base = path if path.is_dir() else path.parent if path.is_file() else None
        # Paths are listed as `str(base / ...)`: the part after this prefix is the key, so the cache
        # holds relative paths (shorter, and true from any working directory).
        self.prefix = None if base is None else "" if str(base) == "." else str(base) + os.sep
        name = hashlib.blake2b(str(path.resolve() if base else source).encode("utf-8", "surrogateescape"),
                               digest_size=12).hexdigest()
        self.folder = folder
        self.facts_path = folder / f"{name}.facts.json.gz"
        self.runs_path = folder / f"{name}.runs.json"
        self.lock = filelock.FileLock(str(folder / f"{name}.lock"))
        self.entries: dict[str, list] = {}
        self.build = 0
        self.changed = False
        self.outcome: str | None = None  # the digest of this build's result, set by the DataModule
        self.looked_up = self.reused = 0
        self.leader_outcome: str | None = None
        self.trusted_before = 0  # ns: a signature is kept for files whose ctime is before this

    # -- what Screening asks ----------------------------------------------------------------

    def _key(self, path: str) -> str:
        if self.prefix is not None and path.startswith(self.prefix):
            return path[len(self.prefix):]
        return os.path.abspath(path)

    def headers(self, paths: list[str], inspect: Callable[[str], FileFacts]) -> list[FileFacts]:
        """Each file's header facts: from the cache where its signature is unchanged, else `inspect`ed."""
        facts = []
        for path in paths:
            key = self._key(path)
            entry = self.entries.get(key)
            if not self.leader:
                if entry is None:
                    raise self._differs(f"it lists {path}, which local rank 0 did not screen")
            else:
                signature = _signature(path)
                if (entry is None or self.refresh or signature is None or entry[SIG] != signature
                        or entry[PROBLEM] is not None):
                    found = inspect(path)
                    if signature is not None and signature[2] >= self.trusted_before:
                        signature = None  # too recent to vouch for: screened again next time
                    fresh = [*(signature or [None] * 4), found.height, found.width, found.mode, found.problem, None]
                    self.changed = self.changed or entry is None or entry[:SEEN] != fresh
                    entry = self.entries[key] = [*fresh, 0]
                else:
                    self.reused += 1
                entry[SEEN] = self.build + 1  # asked for in the next write
            self.looked_up += 1
            facts.append(FileFacts(path, entry[HEIGHT], entry[WIDTH], entry[MODE], entry[PROBLEM]))
        return facts

    def decode(self, facts: FileFacts, mask_labels: tuple[int, int] | None,
               decode: Callable[[FileFacts, tuple[int, int] | None], None]) -> None:
        """`decode(facts, mask_labels)`, or what it found before for this file and these labels."""
        entry = self.entries[self._key(facts.path)]  # headers() came first
        labels = None if mask_labels is None else list(mask_labels)
        known = entry[DECODED]
        if known is not None and known[0] == labels and (not self.leader or known[1] is None):
            _, facts.problem, facts.digest, values = known
            facts.labels = None if values is None else {int(v): int(n) for v, n in values}
            return
        if not self.leader:
            raise self._differs(f"it reads every pixel of {facts.path}, which local rank 0 did not")
        decode(facts, mask_labels)
        values = None if facts.labels is None else sorted(facts.labels.items())
        entry[DECODED] = [labels, facts.problem, facts.digest, values]
        self.changed = True

    def _differs(self, what: str) -> FinetuneError:
        return FinetuneError(
            f"data: this process (local rank {local_rank()}) reads other data than local rank 0 from {self.source}: "
            f"{what} (a folder changing during the run, or a read error on one of them); rerun, or set "
            f"{SWITCH_ENV}=0 to screen in every process")

    # -- the files ------------------------------------------------------------------------------

    def load(self) -> None:
        """The facts on disk; a missing, corrupt or foreign file gives none (one log line)."""
        self.entries, self.build = {}, 0
        try:
            with gzip.open(self.facts_path, "rt", encoding="utf-8") as f, _without_gc():
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, EOFError, ValueError) as error:  # gzip, zlib and JSON errors are among these
            log.warning("screening cache %s is unreadable (%s): screening again", self.facts_path, error)
            return
        try:
            if data.get("format") != FORMAT or data.get("finetune") != __version__:
                log.info("screening cache %s is from %s %s: screening again", self.facts_path,
                         data.get("format"), data.get("finetune"))
                return
            columns = [data["files"][name] for name in COLUMNS]
            if len({len(column) for column in columns}) != 1 or not all(isinstance(c, list) for c in columns):
                raise ValueError("columns of different lengths")
            with _without_gc():
                self.entries = dict(zip(columns[0], map(list, zip(*columns[1:]))))
            self.build = int(data["build"])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            self.entries = {}
            log.warning("screening cache %s is unreadable (%s): screening again", self.facts_path, error)

    def _write(self, path: Path, data: dict, compress: bool) -> None:
        """Atomically: readers see the old file or the new one, never a part."""
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        text = json.dumps(data, separators=(",", ":"))  # ASCII: undecodable names escaped, and back
        try:
            with (gzip.open(temporary, "wt", encoding="utf-8", compresslevel=1) if compress
                  else open(temporary, "w", encoding="utf-8")) as f:
                f.write(text)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def _save_facts(self) -> None:
        build = self.build + 1
        # Entries asked for now are marked `build`; others (removed files, another config's)
        # are kept for KEEP_BUILDS writes: a run on other settings of the same data may need them.
        kept = {key: e for key, e in self.entries.items() if e[SEEN] > build - KEEP_BUILDS}
        files = {"path": list(kept)}
        for i, name in enumerate(COLUMNS[1:]):
            files[name] = [entry[i] for entry in kept.values()]
        self._write(self.facts_path, {"format": FORMAT, "finetune": __version__, "source": self.source,
                                      "build": build, "files": files}, compress=True)

    def _runs(self) -> list[dict]:
        try:
            data = json.loads(self.runs_path.read_text(encoding="utf-8"))
            return data["runs"] if data.get("format") == FORMAT and isinstance(data.get("runs"), list) else []
        except (OSError, ValueError, AttributeError, KeyError):
            return []

    def _record_run(self) -> None:
        record = {"tokens": [process_token(os.getpid()), process_token(os.getppid())], "config": self.config,
                  "outcome": self.outcome}
        runs = [run for run in self._runs() if run != record][-(KEEP_RUNS - 1):] + [record]
        self._write(self.runs_path, {"format": FORMAT, "runs": runs}, compress=False)

    # -- leader and follower ------------------------------------------------------------------

    def start(self, wait_s: float) -> bool:
        """Leader: take the lock and read the cache. Follower: wait for local rank 0's record of
        this run, then read. False: go on without the cache (the lock is not to be had)."""
        if not self.leader:
            self._wait_for_leader(wait_s)
            self.load()
            return True
        self.trusted_before = time.time_ns() - int(RACY_S * 1e9)
        if not self.folder.is_dir():
            if not _started_side_by_side():  # the first use of the cache, and no process waits for this one
                return True
            self.folder.mkdir(parents=True, exist_ok=True)  # for the lock: processes beside it wait while it is held
        try:
            self.lock.acquire(timeout=wait_s)
        except filelock.Timeout:
            log.warning("%s: another process has screened it for over %.0f s (lock %s); screening here without the "
                        "cache (%s sets the wait)", self.source, wait_s, self.lock.lock_file, WAIT_ENV)
            return False
        except OSError as error:  # a file system without locks: take turns without one
            log.info("screening cache: no lock on %s (%s)", self.lock.lock_file, error)
        self.load()
        return True

    def _wait_for_leader(self, wait_s: float) -> None:
        token = process_token(os.getppid())
        deadline = time.monotonic() + wait_s
        while True:
            runs = [r for r in self._runs() if token in r.get("tokens", ()) and r.get("config") == self.config]
            if runs:
                self.leader_outcome = runs[-1].get("outcome")
                return
            if self._lock_held():  # local rank 0 (or a run it waits for) is screening: no time limit
                deadline = time.monotonic() + wait_s
            elif time.monotonic() > deadline:
                raise FinetuneError(
                    f"data: local rank {local_rank()} waited {wait_s:g} s for local rank 0 to screen {self.source} "
                    f"into {self.runs_path.parent}, in vain: did it fail, or read other settings? Set {WAIT_ENV} "
                    f"(seconds) to wait longer, or {SWITCH_ENV}=0 to screen in every process")
            time.sleep(POLL_S)

    def _lock_held(self) -> bool:
        if not self.folder.is_dir():  # acquiring would create it
            return False
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            return True
        except OSError:
            return False
        self.lock.release()
        return False

    def close(self, failed: bool) -> None:
        """Leader: write what changed and this run's record, then unlock. Follower: check that its
        result is local rank 0's (unless the build `failed`: its error is then the one to see)."""
        if not self.leader:
            if not failed and self.outcome != self.leader_outcome:
                raise self._differs("its splits or skipped files differ")
            log.info("%s: screening of local rank 0 read from %s", self.source, self.facts_path)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.changed or self.refresh:
                self._save_facts()
            self._record_run()
            log.info("%s: %d of %d files' screening reused from %s", self.source, self.reused, self.looked_up,
                     self.facts_path)
        except OSError as error:  # a full disk must not fail the run: the cache is an optimisation
            log.warning("screening cache %s not written: %s", self.facts_path, error)
        finally:
            if self.lock.is_locked:
                self.lock.release()


def _started_side_by_side() -> bool:
    """Started by torchrun, srun or a launcher like them, with other ranks running already (under
    Lightning's own launcher, rank 0 builds the DataModule before it starts the others)."""
    return any(name in os.environ for name in ("LOCAL_RANK", "SLURM_LOCALID"))


def _wait_s() -> float:
    value = os.environ.get(WAIT_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        raise FinetuneError(f"{WAIT_ENV}: {value!r} is not a number of seconds; e.g. {WAIT_ENV}=600") from None


def _cache_folder() -> Path | None:
    """`<cache root>/screening`, None where it cannot be written. Not created here but by the first
    write, after the build has listed its files (unless processes beside it need its lock): a
    cache folder inside a data folder (a test's home folder in its data folder) is then not listed
    as a class by the build that makes it."""
    folder = cache_root() / "screening"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return folder if existing is not None and existing.is_dir() and os.access(existing, os.W_OK) else None


@contextmanager
def shared_screening(source: str, config: str, refresh: bool = False) -> Iterator[SharedScreening | None]:
    """The cache of `source` (a data folder, a manifest file or a dataset name) for one build whose
    settings `config` names, or None when off (FINETUNE_SCREENING_CACHE=0, or no writable cache
    folder: then every process screens alone, and every process decides so alike).

    Set `.outcome` (outcome_digest) before leaving; a follower whose outcome differs raises."""
    folder = _cache_folder() if cache_enabled() else None
    if folder is None:
        yield None
        return
    shared = SharedScreening(str(source), folder, config, leader=local_rank() == 0, refresh=refresh)
    if not shared.start(_wait_s()):
        yield None
        return
    try:
        yield shared
    except BaseException:
        shared.outcome = None  # a failed build: followers fail the same way, or are told they differ
        shared.close(failed=True)
        raise
    shared.close(failed=False)
