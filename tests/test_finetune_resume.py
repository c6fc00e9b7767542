"""Training that survives: exact resume after SIGKILL and SIGTERM, best checkpoint, early stopping, loggers.

The kills are real: `littune finetune` runs in a subprocess that SIGKILLs itself at a chosen point (inside an
optimizer step, half-way through writing a state file, just before a step folder is renamed into place).
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, SHORT_RUN_FLAGS, finetune_argv, one_error_line, read_metrics, run_main,
                      sigterm_at_step)
from littune.cli import main
from littune.common import load_torch
from littune.finetune.state import STATE_FILE, find_resume_state
from littune.methods.adapter_v2 import METHOD

ADAPTER_FILE = METHOD.adapter_file

# Runs `littune ARGS` after arranging to SIGKILL itself at KILL_AT=point:N (the N-th time that point is reached).
KILLER = r'''
import io, os, signal, sys
import torch

point, n = os.environ["KILL_AT"].split(":")
n, seen = int(n), {"count": 0}

def reached():
    seen["count"] += 1
    return seen["count"] == n

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "optimizer_step":  # gradients computed, the update not yet applied
    step = torch.optim.AdamW.step
    def killing_step(self, *args, **kwargs):
        if reached():
            die()
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = killing_step
elif point == "state_write":  # half of training_state.pt on disk
    save = torch.save
    def killing_save(obj, f, *args, **kwargs):
        if "training_state" in str(getattr(f, "name", f)) and reached():
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return save(obj, f, *args, **kwargs)
    torch.save = killing_save
elif point == "folder_rename":  # a complete step folder, not yet renamed into place
    replace = os.replace
    def killing_replace(src, dst):
        if os.path.basename(str(dst)).startswith("step-") and reached():
            die()
        return replace(src, dst)
    os.replace = killing_replace

from littune.cli import main
sys.exit(main(sys.argv[1:]))
'''



def run_killed(tmp_path: Path, args: list[str], kill_at: str):
    """`littune ARGS` in a subprocess that SIGKILLs itself at kill_at (see KILLER)."""
    import subprocess

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "KILL_AT": kill_at}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)


def assert_same_tensors(a, b, where: str = ""):
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def newest_state_loads(out_dir: Path, expected_step: int) -> None:
    """What `--resume auto` would pick is the expected step, and both its files load completely."""
    newest = find_resume_state(out_dir, "auto")
    assert newest is not None and newest.name == f"step-{expected_step:06d}"
    state = load_torch(newest / STATE_FILE)
    assert state["counters"]["step"] == expected_step and state["optimizer"]["state"]
    assert load_torch(newest / ADAPTER_FILE)
    for step_dir in out_dir.glob("step-*"):  # every visible checkpoint file is complete
        for f in step_dir.glob("*.pth"):
            load_torch(f)
        load_torch(step_dir / STATE_FILE)


def assert_same_run(resumed: Path, reference: Path, last_step: int, python_rng: bool = True) -> None:
    assert_same_tensors(torch.load(resumed / ADAPTER_FILE, weights_only=True),
                        torch.load(reference / ADAPTER_FILE, weights_only=True), "final adapter")
    a = torch.load(resumed / f"step-{last_step:06d}" / STATE_FILE, weights_only=True)
    b = torch.load(reference / f"step-{last_step:06d}" / STATE_FILE, weights_only=True)
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    rng_kinds = ["torch", "cuda", "numpy"] + (["python"] if python_rng else [])
    assert_same_tensors({k: a["rng"][k] for k in rng_kinds}, {k: b["rng"][k] for k in rng_kinds}, "rng")
    drop = ("elapsed", "mlflow_run_id")
    assert {k: v for k, v in a["counters"].items() if k not in drop} == \
        {k: v for k, v in b["counters"].items() if k not in drop}
    rows, reference_rows = read_metrics(resumed), read_metrics(reference)
    assert [int(r["step"]) for r in rows] == list(range(1, last_step + 1))  # no gaps, no repeats
    for column in ("train_loss", "learning_rate", "val_loss", "tokens"):
        assert [r[column] for r in rows] == [r[column] for r in reference_rows], column
    assert json.loads((resumed / "best" / "adapter_info.json").read_text()) == \
        json.loads((reference / "best" / "adapter_info.json").read_text())


def test_sigkill_at_several_points_then_resume_equals_an_uninterrupted_run(small_checkpoint, alpaca64, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main(finetune_argv(small_checkpoint, alpaca64, reference, *SHORT_RUN_FLAGS)) == 0
    args = finetune_argv(small_checkpoint, alpaca64, out, *SHORT_RUN_FLAGS)

    # 1. inside optimizer step 5: the state of step 4 is the newest
    killed = run_killed(tmp_path, args, kill_at="optimizer_step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    newest_state_loads(out, 4)
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2, 3, 4]

    # 2. resumed, then killed half-way through writing step 6's training_state.pt: step 4 is still the newest
    killed = run_killed(tmp_path, [*args, "--resume", "auto"], kill_at="state_write:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(out.glob(".step-000006.*.tmp")), "the half-written state should be in a hidden temporary folder"
    newest_state_loads(out, 4)

    # 3. resumed (the stale temporary folder is removed), step 6 saved, killed just before step 8's folder appears
    killed = run_killed(tmp_path, [*args, "--resume", "auto"], kill_at="folder_rename:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "Resuming from" in killed.stdout + killed.stderr
    assert not list(out.glob(".step-000006.*"))
    newest_state_loads(out, 6)

    # 4. resumed to the end: the same adapter, optimizer moments, RNG states and metrics as never stopping
    assert main([*args, "--resume", "auto"]) == 0
    assert_same_run(out, reference, 10)
    assert not list(out.rglob("*.tmp*"))


def test_sigterm_finishes_the_step_saves_and_resumes_exactly_with_loggers(small_checkpoint, alpaca64, tmp_path,
                                                                          monkeypatch, capsys):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = [*SHORT_RUN_FLAGS, "--max_steps", "6", "--logger", "[csv, tensorboard, mlflow]"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    assert main(finetune_argv(small_checkpoint, alpaca64, reference, *flags)) == 0

    with monkeypatch.context() as patch:
        sigterm_at_step(patch, 3)
        capsys.readouterr()
        assert main(finetune_argv(small_checkpoint, alpaca64, out, *flags)) == 1
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3" in err and "--resume auto" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
    newest_state_loads(out, 3)
    assert not (out / ADAPTER_FILE).exists()  # no final adapter from a stopped run

    assert main(finetune_argv(small_checkpoint, alpaca64, out, *flags, "--resume", "auto")) == 0
    # Python's global `random` is left out here: the logger libraries draw from it on their own threads (the
    # state differed in about 1 of 3 runs with these loggers on, never without them); training never uses it.
    assert_same_run(out, reference, 6, python_rng=False)

    # MLflow: one run, read back with the client from the local store; metrics as in metrics.csv
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("littune-adapter_v2")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert float(run.data.params["learning_rate"]) == 0.01 and run.data.params["batch_size"] == "4"
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    csv_losses = [float(r["train_loss"]) for r in read_metrics(out)]
    assert [m.step for m in history] == list(range(1, 7))
    assert [m.value for m in history] == pytest.approx(csv_losses, rel=1e-5)
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == [3, 6]

    # TensorBoard: the event files (one per session) read with tensorboard's own reader
    steps = {}
    for events in (out / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for event in accumulator.Scalars("train_loss"):
            steps[event.step] = event.value
    assert sorted(steps) == list(range(1, 7))
    assert [steps[s] for s in range(1, 7)] == pytest.approx(csv_losses, rel=1e-5)


def test_best_checkpoint_and_early_stopping_when_validation_loss_rises(small_checkpoint, alpaca64, tmp_path):
    """A learning rate far too high: the validation loss soon rises; training stops `patience` evaluations after the
    best one, and best/ holds the adapter of that step."""
    out = tmp_path / "run"
    args = finetune_argv(small_checkpoint, alpaca64, out, "--max_steps", 40, "--batch_size", 4,
                         "--micro_batch_size", 4, "--warmup_steps", 0, "--learning_rate", 0.5, "--eval_interval", 1,
                         "--eval_iters", 2, "--save_interval", 1, "--early_stopping_patience", 3, "--seed", 1)
    assert main(args) == 0
    rows = read_metrics(out)
    val = {int(r["step"]): float(r["val_loss"]) for r in rows}
    best_step = min(val, key=val.get)
    last_step = int(rows[-1]["step"])
    assert last_step == best_step + 3 < 40  # stopped early, three evaluations without improvement
    assert all(val[s] > val[best_step] for s in range(best_step + 1, last_step + 1))
    info = json.loads((out / "best" / "adapter_info.json").read_text())
    assert info["step"] == best_step and info["val_loss"] == pytest.approx(val[best_step], rel=1e-5)
    assert_same_tensors(torch.load(out / "best" / ADAPTER_FILE, weights_only=True),
                        torch.load(out / f"step-{best_step:06d}" / ADAPTER_FILE, weights_only=True))
    assert (out / "best" / "prompt_style.yaml").is_file() and (out / "best" / "hyperparameters.yaml").is_file()

    # resuming an early-stopped run does not train on
    assert main([*args, "--resume", "auto"]) == 0
    assert int(read_metrics(out)[-1]["step"]) == last_step


def test_resume_refuses_another_run_or_a_damaged_state(small_checkpoint, alpaca64, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 2, "--save_interval", 1]
    assert main(finetune_argv(small_checkpoint, alpaca64, out, *flags)) == 0

    def refused(*extra) -> str:
        result = run_main(capsys, *finetune_argv(small_checkpoint, alpaca64, out, *flags, *extra))
        return one_error_line(result, code=1, alone=True)

    err = refused("--learning_rate", "0.1", "--resume", "auto")
    assert "cannot resume" in err and "learning_rate" in err and "step-000002" in err
    assert "--resume" in refused("--resume", str(tmp_path))  # a folder without a training state

    state = out / "step-000002" / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])  # damaged on disk after it was written
    err = refused("--resume", "auto")
    assert str(state) in err and "training state" in err  # (test_finetune runs a bad finetune as a user does)


def test_a_crafted_training_state_is_refused_in_one_line_naming_its_field(small_checkpoint, alpaca64, tmp_path,
                                                                           capsys):
    """Issue 36 #4: every part of training_state.pt is checked by type and range before a resumed run uses it (it
    was: step 10**30 reported "Done" and overwrote the final adapter, step -5 wrote step--00001, the others were
    tracebacks); the run folder is left as it was."""
    out = tmp_path / "run"
    flags = ["--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 2, "--save_interval", 1]
    assert main(finetune_argv(small_checkpoint, alpaca64, out, *flags)) == 0
    saved = torch.load(out / "step-000001" / STATE_FILE, weights_only=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crafted(**parts):
        """A copy of step-000001 whose state has `parts` replaced ("counters.step" = one counter)."""
        state = {**saved, "counters": dict(saved["counters"]), "rng": dict(saved["rng"])}
        for name, value in parts.items():
            part, _, key = name.partition(".")
            if key:
                state[part][key] = value
            else:
                state[part] = value
        folder = tmp_path / "crafted" / f"step-{len(list(tmp_path.glob('crafted/*'))):06d}"
        shutil.copytree(out / "step-000001", folder)
        torch.save(state, folder / STATE_FILE)
        return folder

    cases = [({"counters.step": 10**30}, "counters.step"), ({"counters.step": -5}, "counters.step"),
             ({"counters.step": "1"}, "counters.step"), ({"counters.epoch": 2**70}, "counters.epoch"),
             ({"fingerprint": list(saved["fingerprint"].items())}, "fingerprint"), ({"optimizer": {}}, "optimizer"),
             ({"rng.torch": torch.zeros(3, dtype=torch.uint8)}, "rng.torch"), ({"rng.python": "x"}, "rng.python"),
             ({"rng.numpy": ["MT19937", [1, 2], 0, 0, 0.0]}, "rng.numpy"), ({"counters": "step"}, "counters"),
             ({"counters.best_value": "abc"}, "counters.best_value"), ({"counters.best_step": 7}, "counters.best_step")]
    for parts, field in cases:
        folder = crafted(**parts)
        capsys.readouterr()
        result = run_main(capsys, *finetune_argv(small_checkpoint, alpaca64, out, *flags, "--resume", folder))
        line = one_error_line(result, f"{folder / STATE_FILE}: {field} ")
        assert result.returncode == 1 and len(line) < 400, (parts, line)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, parts  # nothing written


def test_best_folder_is_replaced_whole_and_leftovers_of_a_kill_are_cleaned(small_checkpoint, alpaca64, tmp_path,
                                                                           monkeypatch):
    """best/ holds the weights and adapter_info.json of one step: a failure while writing the second best/ leaves
    the first one whole (an earlier littune replaced the weights, then failed on the figures). The next run removes
    the temporaries a kill leaves and puts back a best/ set aside for a replacement that never arrived."""
    out = tmp_path / "run"
    args = finetune_argv(small_checkpoint, alpaca64, out, "--max_steps", 3, "--batch_size", 4, "--micro_batch_size",
                         4, "--warmup_steps", 0, "--learning_rate", 0.01, "--eval_interval", 1, "--eval_iters", 2,
                         "--save_interval", 1, "--seed", 1, "--precision", "32-true")
    dumps, calls = json.dumps, {"best": 0}

    def failing_second_best_info(obj, *a, **k):
        if isinstance(obj, dict) and {"metric", "step", "value"} <= obj.keys():
            calls["best"] += 1
            if calls["best"] == 2:
                raise OSError("disk full")
        return dumps(obj, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(json, "dumps", failing_second_best_info)
        with pytest.raises(OSError, match="disk full"):
            main(args)
    info = json.loads((out / "best" / "adapter_info.json").read_text())
    assert info["step"] == 1  # the old figures, and the old weights with them
    assert_same_tensors(torch.load(out / "best" / ADAPTER_FILE, weights_only=True),
                        torch.load(out / "step-000001" / ADAPTER_FILE, weights_only=True))
    assert not list(out.glob(".*"))  # the failed write cleaned up after itself

    # what a SIGKILL leaves: a half-built best/ and step folder, and best/ set aside just before the new one's rename
    (out / ".best.abcd1234.tmp").mkdir()
    (out / ".best.abcd1234.tmp" / ADAPTER_FILE).write_bytes(b"half")
    (out / ".step-000002.efgh5678.tmp").mkdir()
    (out / "best").rename(out / ".best.ijkl9012.tmp.old")
    (out / "best.old-user-file.tmp").write_text("not ours: no leading dot")
    from littune.finetune.state import remove_stale_temporaries

    remove_stale_temporaries(out)
    assert json.loads((out / "best" / "adapter_info.json").read_text()) == info  # put back
    assert sorted(p.name for p in out.glob(".*")) == [] and (out / "best.old-user-file.tmp").is_file()
    (out / ".best.mnop3456.tmp.old").mkdir()  # set aside, and the new best/ did arrive: the old one goes
    (out / ".step-000001.qrst7890.tmp").mkdir()
    assert main([*args, "--resume", "auto"]) == 0
    assert not list(out.glob(".*"))
    info = json.loads((out / "best" / "adapter_info.json").read_text())
    assert info["step"] in (2, 3)
    assert_same_tensors(torch.load(out / "best" / ADAPTER_FILE, weights_only=True),
                        torch.load(out / f"step-{info['step']:06d}" / ADAPTER_FILE, weights_only=True))
