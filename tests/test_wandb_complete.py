"""What a fit leaves in its W&B run, read back from the offline run's own .wandb file: the whole
config, the best and last checkpoints as model artifacts, the same run after a resume, and an
export logged into that run."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from wandb.proto import wandb_internal_pb2

from finetune.cli import create_cli
from finetune.export.wandb_artifact import log_exported

REPO = Path(__file__).resolve().parents[1]

# wandb writes runs in LevelDB's log format (github.com/google/leveldb doc/log_format.md): a 7-byte
# file header, then 32 KiB blocks of records (crc32, length, type: FULL, FIRST, MIDDLE, LAST).
# wandb 0.31 no longer ships a Python reader (its sync moved into wandb-core): this is the format.
BLOCK, HEADER, FULL, LAST = 32768, 7, 1, 4


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run. wandb-core may still be writing the file when
    `run.finish()` returns: read until it holds the run's `exit` record (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        records = _read_records(path)
        if of_type(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if not data:
        return []
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, parts, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if room < HEADER or (kind == 0 and length == 0):  # a block's zero-filled trailer
            pos += room
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: corrupt record at byte {pos}"
        pos += HEADER + length
        parts += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def run_config(records) -> dict:
    """The run's config as the server would hold it: the run record's, then each update."""
    config = {}
    for updates in [r.config for r in of_type(records, "run")] + of_type(records, "config"):
        config.update({item.key: json.loads(item.value_json) for item in updates.update})
    return config


def offline_runs(run: Path) -> set[Path]:
    """The .wandb file of each offline run under `run`."""
    return set((run / "wandb").glob("offline-run-*/run-*.wandb"))


def fit_args(data: Path, run: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "16", "--data.num_workers", "0",
        "--model.pretrained", "false", "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", str(epochs),
        "--trainer.logger.init_args.log_model", "true", *extra,
    ]


@pytest.fixture(scope="module")
def two_fits(colour_folder, tmp_path_factory):
    """A 2-epoch fit, then the same fit resumed from last.ckpt to 3 epochs (removed after: ~0.8 GB of
    checkpoints and their staged copies)."""
    run = tmp_path_factory.mktemp("wandb_complete") / "run"
    with pytest.MonkeyPatch.context() as env:  # what conftest's _no_wandb_in_home does per test
        env.setenv("HOME", str(run.parent / "home"))
        for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            env.delenv(var, raising=False)
        first = create_cli(fit_args(colour_folder, run, 2)).trainer
        [first_file] = offline_runs(run)
        # The resumed fit rewrites last.ckpt (a longer report history, new weights): sizes now.
        sizes = {path.name: path.stat().st_size for path in (run / "checkpoints").glob("*.ckpt")}
        resumed = create_cli(fit_args(colour_folder, run, 3, "--ckpt_path", "last")).trainer
        [resumed_file] = offline_runs(run) - {first_file}
    yield {"run": run, "first": first, "resumed": resumed, "first_file": first_file, "resumed_file": resumed_file,
           "first_sizes": sizes}
    shutil.rmtree(run)


def test_the_whole_resolved_config_and_command_are_the_runs_config(two_fits):
    config = run_config(wandb_records(two_fits["first_file"]))
    assert config["trainer"]["max_epochs"] == 2 and config["trainer"]["limit_train_batches"] == 2
    assert config["model"]["init_args"]["backbone"] == "resnet18"
    assert config["model"]["init_args"]["pretrained"] is False
    assert config["data"]["init_args"]["image_size"] == 32
    assert config["checkpoint"]["monitor"] == "val/acc" and config["checkpoint"]["mode"] == "max"  # from the contract
    assert config["trainer"]["callbacks"][0]["class_path"] == "finetune.callbacks.WandbMediaLogger"
    assert config["command"].startswith("finetune fit --config ") and "--trainer.max_epochs 2" in config["command"]
    # Lightning's config.yaml is still written (overwritten by the resumed fit, into the same folder).
    saved = yaml.safe_load((Path(two_fits["resumed"].log_dir) / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 3 and saved["model"]["init_args"]["backbone"] == "resnet18"


def test_best_and_last_checkpoints_are_model_artifacts_with_their_scores(two_fits):
    records = wandb_records(two_fits["first_file"])
    [run_record] = of_type(records, "run")
    checkpoint = two_fits["first"].checkpoint_callback
    best, last = [a for a in of_type(records, "artifact") if a.type == "model"]
    # W&B puts `latest` on every version it logs: the server moves it to the last one, last.ckpt.
    assert sorted(best.aliases) == ["best", "latest"] and list(last.aliases) == ["latest"]
    for artifact, path, score in [
        (best, checkpoint.best_model_path, checkpoint.best_model_score),
        (last, checkpoint.last_model_path, two_fits["first"].callback_metrics["val/acc"]),
    ]:
        metadata = json.loads(artifact.metadata)
        assert artifact.type == "model" and artifact.name == f"model-{run_record.run_id}"
        assert metadata["score"] == pytest.approx(float(score)) and metadata["monitor"] == "val/acc"
        assert metadata["original_filename"] == Path(path).name
        [entry] = artifact.manifest.contents
        assert entry.path == "model.ckpt" and entry.size == two_fits["first_sizes"][Path(path).name]
    assert Path(checkpoint.last_model_path).name == "last.ckpt"
    assert Path(checkpoint.best_model_path).name.startswith("best-epoch")


def test_a_fit_resumed_from_last_ckpt_writes_into_the_same_run(two_fits):
    first_id = of_type(wandb_records(two_fits["first_file"]), "run")[0].run_id
    checkpoint = torch.load(two_fits["run"] / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert checkpoint["wandb_run_id"] == first_id and checkpoint["wandb_project"] == "finetune-quickstart"
    resumed = wandb_records(two_fits["resumed_file"])
    [run_record] = of_type(resumed, "run")
    assert run_record.run_id == first_id and run_record.resume
    assert two_fits["resumed"].current_epoch == 3
    assert run_config(resumed)["trainer"]["max_epochs"] == 3
    best, last = [a for a in of_type(resumed, "artifact") if a.type == "model"]
    assert best.name == last.name == f"model-{first_id}" and list(last.aliases) == ["latest"]
    assert json.loads(last.metadata)["score"] == pytest.approx(float(two_fits["resumed"].callback_metrics["val/acc"]))


def test_an_explicit_run_id_is_not_replaced_by_the_checkpoints(two_fits, colour_folder, tmp_path):
    last = str(two_fits["run"] / "checkpoints" / "last.ckpt")  # 3 epochs done: this fit trains none
    create_cli(fit_args(colour_folder, tmp_path, 3, "--ckpt_path", last, "--trainer.logger.init_args.id", "mine01"))
    [file] = offline_runs(tmp_path)
    assert of_type(wandb_records(file), "run")[0].run_id == "mine01"


def test_log_exported_adds_a_model_artifact_to_the_training_run(two_fits, tmp_path):
    exported = tmp_path / "best.onnx"
    exported.write_bytes(b"onnx bytes")
    best = two_fits["first"].checkpoint_callback.best_model_path
    log_exported(exported, best, {"format": "onnx", "opset": 17})

    new = offline_runs(two_fits["run"]) - {two_fits["first_file"], two_fits["resumed_file"]}
    assert len(new) == 1, "the export's run is not under the training run's folder"
    records = wandb_records(new.pop())
    [run_record] = of_type(records, "run")
    first_id = of_type(wandb_records(two_fits["first_file"]), "run")[0].run_id
    assert run_record.run_id == first_id and run_record.project == "finetune-quickstart"
    [artifact] = [a for a in of_type(records, "artifact") if a.type == "model"]
    assert artifact.type == "model" and artifact.name == f"onnx-{first_id}"
    assert json.loads(artifact.metadata) == {"format": "onnx", "opset": 17}
    assert [(e.path, e.size) for e in artifact.manifest.contents] == [("best.onnx", 10)]
    assert not list((tmp_path / "home").rglob("*wandb*")), "W&B wrote into the home folder"


def test_log_exported_logs_a_hub_folder_and_a_release_with_its_config(tmp_path):
    run = tmp_path / "run"
    (run / "wandb").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"wandb_run_id": "run00001", "wandb_project": "proj"}, ckpt)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    (hub / "model.safetensors").write_bytes(b"12")
    log_exported(hub, str(ckpt), {"format": "hub"})
    (tmp_path / "release.safetensors").write_bytes(b"123")
    (tmp_path / "release.yaml").write_text("a: 1\n")
    log_exported(tmp_path / "release.safetensors", str(ckpt), {})

    artifacts = [a for file in offline_runs(run) for a in of_type(wandb_records(file), "artifact")]
    assert sorted((a.name, sorted((e.path, e.size) for e in a.manifest.contents)) for a in artifacts) == [
        ("hub-run00001", [("config.json", 2), ("model.safetensors", 2)]),
        ("safetensors-run00001", [("release.safetensors", 3), ("release.yaml", 5)]),  # the weights need their config
    ]


def test_log_exported_refuses_a_checkpoint_without_a_run_and_an_open_run(tmp_path):
    import wandb

    from finetune.errors import FinetuneError

    (tmp_path / "model.onnx").write_bytes(b"x")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(FinetuneError, match="plain.ckpt holds no W&B run id"):
        log_exported(tmp_path / "model.onnx", str(tmp_path / "plain.ckpt"), {})
    torch.save({"wandb_run_id": "run00002", "wandb_project": "proj"}, tmp_path / "run.ckpt")
    with wandb.init(mode="offline", dir=str(tmp_path)) as open_run:
        with pytest.raises(FinetuneError, match=f"W&B run {open_run.id} is still open"):
            log_exported(tmp_path / "model.onnx", str(tmp_path / "run.ckpt"), {})


def test_gpu_configs_log_checkpoints_and_quickstarts_do_not():
    def log_model(name: str):
        return yaml.safe_load((REPO / "configs" / name).read_text())["trainer"]["logger"]["init_args"].get("log_model")

    for name in ("classify.yaml", "classify_strong.yaml", "segment.yaml", "faces.yaml"):
        assert log_model(name) is True, name
    for name in ("quickstart.yaml", "faces_quickstart.yaml", "multilabel_quickstart.yaml", "segment_quickstart.yaml"):
        assert log_model(name) is False, name


def test_the_interpretation_tables_are_in_the_run(two_fits):
    """At the end of a classification fit the report's top losses, likely mislabelled and most
    confused pairs go to W&B as tables, as they go to report/ as CSVs."""
    logged = {}  # W&B flattens a table's entry into one item per field: key/_type, key/nrows, ...
    for history in of_type(wandb_records(two_fits["first_file"]), "history"):
        logged.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in history.item})
    assert logged["interpretation/top_losses/_type"] == "table-file"
    assert logged["interpretation/top_losses/ncols"] == 7  # image, path, true, predicted, p's, loss
    assert logged["interpretation/top_losses/nrows"] == 20  # 2 x SHOWN of the 24 validation images
    assert logged["interpretation/most_confused/ncols"] == 3
    assert logged["interpretation/likely_mislabelled/_type"] == "table-file"
    rows = (two_fits["run"] / "report" / "interpret-val.csv").read_text().splitlines()
    assert len(rows) == 1 + 24
