"""The screening cache (finetune/data/screening_cache.py): a file is opened once, by one process,
until it changes; builds with and without the cache give the same splits and report; a
process that is not local rank 0 takes rank 0's screening and stops when its own result
differs; a corrupt cache is rebuilt; `check-data --refresh_cache true` opens every file again."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import filelock
import pytest
from bad_inputs import (
    good_image,
    text_as_image,
    write_messy_classification,
    write_messy_identities,
    write_messy_segmentation,
)
from conftest import write_colour_images

from finetune import check_data
from finetune.data import (
    IdentityFolderDataModule,
    ImageFolderDataModule,
    ManifestDataModule,
    SegmentationFolderDataModule,
    screening,
    screening_cache,
)
from finetune.data.screening import screening as screened_as
from finetune.errors import FinetuneError

REPO = Path(__file__).resolve().parents[1]
FILES = 13  # colours(): 12 images and a text file named .png


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    for name in ("LOCAL_RANK", "SLURM_LOCALID", screening_cache.SWITCH_ENV, screening_cache.WAIT_ENV):
        monkeypatch.delenv(name, raising=False)
    # Files written by a test are seconds old: trust their signatures (test_a_file_changed_just_now...).
    monkeypatch.setattr(screening_cache, "RACY_S", 0.0)


@pytest.fixture
def opened(monkeypatch) -> Counter:
    """How many headers and full decodes screening performs."""
    counts = Counter()
    inspect_header, decode = screening.inspect_header, screening.decode

    def counted_header(path):
        counts["headers"] += 1
        return inspect_header(path)

    def counted_decode(facts, mask_labels=None):
        counts["decodes"] += 1
        decode(facts, mask_labels)

    monkeypatch.setattr(screening, "inspect_header", counted_header)
    monkeypatch.setattr(screening, "decode", counted_decode)
    return counts


def colours(tmp_path: Path) -> Path:
    root = tmp_path / "colours"
    write_colour_images(root, 4, seed=0, size=8)
    text_as_image(root / "red" / "note.png")
    return root


def build(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), **{"backbone": "resnet18", "image_size": 8, "num_workers": 0, **kwargs})


def result(dm) -> tuple:
    report = dm.report.to_dict()
    report.pop("seconds")
    return dm.splits, dm.bad_files.records, report


def cache_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "screening"
    return sorted(p.name.split(".", 1)[1] for p in folder.iterdir()) if folder.is_dir() else []


def test_a_second_build_opens_only_the_bad_file_and_gives_the_uncached_result(tmp_path, opened, monkeypatch):
    root = colours(tmp_path)
    monkeypatch.setenv(screening_cache.SWITCH_ENV, "0")
    expected = result(build(root))
    assert opened == {"headers": FILES, "decodes": FILES - 1} and cache_files(tmp_path) == []
    monkeypatch.delenv(screening_cache.SWITCH_ENV)
    for run in range(3):
        opened.clear()
        assert result(build(root)) == expected
        # 1st: everything; then only the file with a problem (a read error may pass), no decode.
        assert opened == ({"headers": FILES, "decodes": FILES - 1} if run == 0 else {"headers": 1})
    assert cache_files(tmp_path) == ["facts.json.gz", "lock", "runs.json"]
    assert expected[1] == {str(root / "red" / "note.png"): ("not an image: text (55 bytes)", "image", "setup")}


@pytest.mark.parametrize("mode", ["full", "headers"])
def test_every_datamodule_gives_the_same_result_with_and_without_the_cache(tmp_path, monkeypatch, mode):
    """Messy folders (links, bombs, truncated files, bad masks, missing files): splits, skipped
    files and the whole report are those of an uncached build, cold and warm."""
    classes = write_messy_classification(tmp_path / "classes")
    rows = [(p, Path(p).parent.name) for p in list(classes.loaded) + list(classes.skipped)[:3]]
    rows += [(str(classes.root / "red" / f"{i}.png"), "red") for i in range(6)]
    rows += [(str(classes.root / "sea lion" / f"{i}.png"), "sea lion") for i in range(6)]
    rows.append((str(classes.root / "red" / "gone.png"), "red"))  # a row whose file does not exist
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f'"{p}",{label}\n' for p, label in rows), encoding="utf-8")
    segments = write_messy_segmentation(tmp_path / "segments")
    identities = write_messy_identities(tmp_path / "identities")
    builds = [
        lambda: build(classes.root, image_size=32),
        lambda: ManifestDataModule(str(manifest), backbone="resnet18", image_size=32, num_workers=0),
        lambda: SegmentationFolderDataModule(str(segments.root), backbone="resnet18", crop_size=32, num_workers=0),
        lambda: IdentityFolderDataModule(str(identities.root), backbone="resnet18", val_fraction=0.4, num_workers=0),
    ]
    for make in builds:
        with screened_as(mode):
            monkeypatch.setenv(screening_cache.SWITCH_ENV, "0")
            expected = result(make())
            monkeypatch.delenv(screening_cache.SWITCH_ENV)
            cold, warm = result(make()), result(make())
        assert expected[1] and expected[2]["checked"] == ("every pixel" if mode == "full" else "headers")
        assert cold == expected and warm == expected


def test_added_touched_rewritten_and_removed_files_are_seen(tmp_path, opened, monkeypatch):
    monkeypatch.setattr(screening_cache, "KEEP_BUILDS", 1)  # forget a file at the first write without it
    root = colours(tmp_path)
    build(root)
    red = root / "red" / "red_000.png"

    opened.clear()
    good_image(root / "red" / "new.png", size=8)
    dm = build(root)
    assert str(root / "red" / "new.png") in {p for p, _ in dm.splits.train + dm.splits.val}
    assert opened["headers"] == 2  # the new file and the bad file

    opened.clear()
    os.utime(red, (time.time() + 5, time.time() + 5))  # touched: a new mtime
    build(root)
    assert opened["headers"] == 2  # red_000 and the bad file

    opened.clear()
    before = os.stat(red)
    good_image(red, seed=7, size=8)  # new content, then the old mtime put back (as `cp -p` or rsync do)
    os.utime(red, ns=(before.st_atime_ns, before.st_mtime_ns))
    build(root)
    assert opened["headers"] == 2  # its ctime changed

    opened.clear()
    (root / "red" / "red_001.png").unlink()
    os.utime(red, (time.time() + 9, time.time() + 9))  # a change too, so that the cache is written
    dm = build(root)
    assert opened["headers"] == 2 and str(root / "red" / "red_001.png") not in {p for p, _ in dm.splits.train}
    [facts] = (tmp_path / "cache" / "screening").glob("*.facts.json.gz")
    paths = json.loads(gzip.decompress(facts.read_bytes()))["files"]["path"]
    assert "red/red_001.png" not in paths and "red/red_000.png" in paths and len(paths) == FILES


def test_a_file_changed_just_now_is_screened_again_next_time(tmp_path, opened, monkeypatch):
    monkeypatch.setattr(screening_cache, "RACY_S", 3600.0)  # every file counts as just written
    root = colours(tmp_path)
    build(root)
    opened.clear()
    build(root)
    assert opened["headers"] == FILES


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "columns"])
def test_a_corrupt_or_foreign_cache_counts_as_a_miss_and_is_rewritten(tmp_path, opened, caplog, damage):
    root = colours(tmp_path)
    expected = result(build(root))
    [facts] = (tmp_path / "cache" / "screening").glob("*.facts.json.gz")
    good = facts.read_bytes()
    data = json.loads(gzip.decompress(good))
    broken = {
        "garbage": b"not gzip at all",
        "truncated": good[: len(good) // 2],
        "foreign": gzip.compress(json.dumps({**data, "format": "finetune-screening/0"}).encode()),
        "columns": gzip.compress(json.dumps({**data, "files": {**data["files"], "size": [1]}}).encode()),
    }[damage]
    facts.write_bytes(broken)
    opened.clear()
    with caplog.at_level(logging.INFO, logger="finetune.data.screening_cache"):
        assert result(build(root)) == expected
    lines = [r.getMessage() for r in caplog.records if "screening again" in r.getMessage()]
    assert len(lines) == 1 and str(facts) in lines[0]
    assert opened["headers"] == FILES
    opened.clear()
    build(root)
    assert opened == {"headers": 1}  # rewritten


def test_check_data_writes_the_cache_training_reads_and_refresh_cache_rewrites_it(tmp_path, opened, capsys):
    root = colours(tmp_path)
    args = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(root),
            "--data.image_size", "8", "--json", "-"]
    reports = []
    for extra in ([], [], ["--refresh_cache", "true"]):
        opened.clear()
        assert check_data.main(args + extra) == 0
        reports.append(json.loads(capsys.readouterr().out))
        reports[-1].pop("seconds")
        counts = dict(opened)
        assert counts == ({"headers": 1} if len(reports) == 2 else {"headers": FILES, "decodes": FILES - 1}), extra
    assert reports[0] == reports[1] == reports[2] and reports[0]["checked"] == "every pixel"
    opened.clear()
    with screened_as("headers"):  # a training run on a large set: headers only, all from check-data's screening
        build(root)
    assert opened == {"headers": 1}


def test_a_process_after_local_rank_0_reads_its_screening_and_stops_when_it_sees_other_files(tmp_path, opened,
                                                                                            monkeypatch):
    root = colours(tmp_path)
    expected = result(build(root))
    monkeypatch.setenv("LOCAL_RANK", "1")  # this process's parent is the leader's parent: as siblings under torchrun
    opened.clear()
    assert result(build(root)) == expected
    assert opened == {}  # not even the bad file: rank 0's verdict is taken

    good_image(root / "green" / "late.png", size=8)
    with pytest.raises(FinetuneError, match=r"^data: this process \(local rank 1\) reads other data than local "
                                            r"rank 0 .*: it lists .*late\.png, which local rank 0 did not screen"):
        build(root)
    (root / "green" / "late.png").unlink()
    (root / "green" / "green_000.png").unlink()
    with pytest.raises(FinetuneError, match="its splits or skipped files differ"):
        build(root)


def test_a_process_waits_for_local_rank_0_while_it_screens_then_gives_up_in_one_line(tmp_path, monkeypatch):
    root = colours(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(screening_cache.WAIT_ENV, "0.3")
    folder = tmp_path / "cache" / "screening"
    folder.mkdir(parents=True)
    lock_file = screening_cache.SharedScreening(str(root), folder, "any", leader=False).lock.lock_file
    held = filelock.FileLock(lock_file, thread_local=False)  # released by the timer thread
    held.acquire()
    threading.Timer(1.0, held.release).start()  # "local rank 0" screens for 1 s, then fails to write
    start = time.monotonic()
    with pytest.raises(FinetuneError, match=r"^data: local rank 1 waited 0.3 s for local rank 0 to screen .*colours "
                                            r"into .*, in vain: .*FINETUNE_SCREENING_WAIT.*FINETUNE_SCREENING_CACHE=0"):
        build(root)
    assert 1.0 < time.monotonic() - start < 5  # waited while the lock was held, then 0.3 s


SCRIPT = """
import json, sys, time
from finetune.data import screening
from finetune.data.classification import ImageFolderDataModule
headers = 0
inspect_header = screening.inspect_header
def slow_header(path):  # slow screening: the other process must wait for it
    global headers
    headers += 1
    time.sleep(0.05)
    return inspect_header(path)
screening.inspect_header = slow_header
dm = ImageFolderDataModule(sys.argv[1], backbone="resnet18", image_size=8, num_workers=0)
print(json.dumps({"headers": headers, "train": dm.splits.train, "val": dm.splits.val,
                  "skipped": sorted(dm.bad_files.records)}))
"""


def run_processes(tmp_path: Path, root: Path, ranks: list[int], delay: float = 0.0) -> list[dict]:
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FINETUNE_CACHE": str(tmp_path / "cache")}
    processes = []
    for rank in ranks:
        processes.append(subprocess.Popen([sys.executable, str(script), str(root)], env={**env, "LOCAL_RANK": str(rank)},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(delay)
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


def test_two_processes_of_one_launch_screen_once_and_split_alike(tmp_path):
    """As torchrun or srun start them: siblings. Rank 1 starts first and waits for rank 0."""
    root = colours(tmp_path)
    follower, leader = run_processes(tmp_path, root, [1, 0], delay=0.5)
    assert leader["headers"] == FILES and follower["headers"] == 0
    assert follower == {**leader, "headers": 0}
    assert len(leader["train"]) + len(leader["val"]) == FILES - 1 and leader["skipped"] == [str(root / "red" / "note.png")]


def test_a_process_started_by_local_rank_0_reads_its_screening(tmp_path):
    """As Lightning's launcher starts them: rank 0 builds the DataModule, then starts rank 1."""
    root = colours(tmp_path)
    dm = build(root)
    [follower] = run_processes(tmp_path, root, [1])
    assert follower["headers"] == 0
    assert [tuple(item) for item in follower["train"]] == dm.splits.train
    assert [tuple(item) for item in follower["val"]] == dm.splits.val


def test_the_cache_folder_is_made_after_the_listing_and_a_bad_wait_is_one_line(tmp_path, monkeypatch):
    root = colours(tmp_path)
    monkeypatch.setenv("FINETUNE_CACHE", str(root / "cache"))  # as a test's home folder inside its data folder
    dm = build(root)
    assert dm.class_names == ["blue", "green", "red"] and list(dm.bad_files.records) == [str(root / "red" / "note.png")]
    assert (root / "cache" / "screening").is_dir()
    monkeypatch.setenv(screening_cache.WAIT_ENV, "soon")
    with pytest.raises(FinetuneError, match=r"^FINETUNE_SCREENING_WAIT: 'soon' is not a number of seconds"):
        build(tmp_path / "colours")
