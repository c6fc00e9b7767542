"""A run's experiment loggers (littune/finetune/logs.py) beyond metrics.csv: Weights & Biases, offline (no network),
through the real CLI; a run stopped by SIGTERM and resumed goes on logging into the same W&B run."""

import json

import pytest
import torch
import yaml

from conftest import SHORT_RUN_FLAGS, finetune_argv, one_error_line, read_metrics, run_main, sigterm_at_step
from littune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wandb_runs(out_dir):
    """The offline run folders W&B wrote under out_dir/wandb, one per session: {folder name: run id}."""
    return {p.name: p.name.rsplit("-", 1)[1] for p in sorted((out_dir / "wandb").glob("offline-run-*"))}


def wandb_records(path):
    """The records of an offline run's .wandb file (W&B's protobuf Records in LevelDB's log format: a 7-byte file
    header, then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_logged(out_dir) -> tuple[dict, dict]:
    """(config, {step: train_loss}) of every session of the run, read from the offline files."""
    import json as json_

    config, losses = {}, {}

    def key(item) -> str:  # a flat key, or a nested one ("trainer/global_step")
        return item.key or "/".join(item.nested_key)

    for folder in sorted((out_dir / "wandb").glob("offline-run-*")):
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "config":
                config.update({key(item): json_.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                row = {key(item): json_.loads(item.value_json) for item in record.history.item}
                if "train_loss" in row:
                    losses[row["trainer/global_step"]] = row["train_loss"]
    return config, losses


def test_wandb_offline_run_gets_the_flags_and_metrics_and_resume_continues_it(small_checkpoint, alpaca64, tmp_path,
                                                                           monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    flags = [*SHORT_RUN_FLAGS, "--max_steps", "4", "--logger", "[csv, wandb]"]
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        sigterm_at_step(patch, 2)
        assert main(finetune_argv(small_checkpoint, alpaca64, out, *flags)) == 1
    first = wandb_runs(out)
    assert len(first) == 1
    run_id = next(iter(first.values()))
    state = torch.load(out / "step-000002" / "training_state.pt", weights_only=True)
    assert state["counters"]["wandb_run_id"] == run_id

    assert main(finetune_argv(small_checkpoint, alpaca64, out, *flags, "--resume", "auto")) == 0
    sessions = wandb_runs(out)
    assert len(sessions) == 2 and set(sessions.values()) == {run_id}  # the second session continues the same run

    # the run's flags as its config; every step's figures, as metrics.csv has them, once
    config, losses = wandb_logged(out)
    assert config["learning_rate"] == 0.01 and config["method"] == "adapter_v2" and config["max_steps"] == 4
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == sorted(losses) == [1, 2, 3, 4]
    assert [losses[int(r["step"])] for r in rows] == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-5)

    # --overwrite starts over: the run's W&B folder goes with its other outputs
    assert main(finetune_argv(small_checkpoint, alpaca64, out, *SHORT_RUN_FLAGS, "--max_steps", "1", "--overwrite",
                              "true")) == 0
    assert not (out / "wandb").exists()


def test_wandb_without_the_package_is_one_line(small_checkpoint, alpaca64, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    result = run_main(capsys, *finetune_argv(small_checkpoint, alpaca64, tmp_path / "run", *SHORT_RUN_FLAGS, "--logger",
                                             "[wandb]"))
    line = one_error_line(result, code=1, alone=True)
    assert line.startswith("littune: error: --logger wandb needs Weights & Biases")
