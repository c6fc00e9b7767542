"""`littune sweep adapter_v2`: the real CLI on the tiny GPT-NeoX and 64 Alpaca records: pruning, resume after a
SIGKILL, two processes on one SQLite study, best.yaml reproducing the best trial's weights, bad input."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import listing, one_error_line, run_main
from littune.cli import main

pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ADAPTER = "lit_model_adapter_finetuned.pth"
# lr 5 blows the validation loss up at the first evaluation (about 60 against 6 at lr 0.01): a trial drawing it
# after a completed lr-0.01 trial is pruned there; seed 1337 draws 5, 0.01, 5
SPACE = '{"learning_rate": {"choices": [0.01, 5.0]}}'
FAST = ["--max_steps", "4", "--micro_batch_size", "4", "--batch_size", "4", "--eval_interval", "1", "--eval_iters",
        "1", "--save_interval", "1000", "--pruner_startup_trials", "1"]


def sweep_args(checkpoint, data, out, *extra) -> list[str]:
    return ["sweep", "adapter_v2", "--checkpoint_dir", str(checkpoint), "--data_dir", str(data), "--out_dir",
            str(out), "--search", SPACE, *FAST, *map(str, extra)]


def table(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def study_trials(out: Path):
    import optuna

    return optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'sweep.db'}").get_trials()


def test_three_trials_one_pruned_and_best_yaml_reproduces_the_best_weights(small_checkpoint, alpaca64, tmp_path,
                                                                         capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(small_checkpoint, alpaca64, out, "--n_trials", 3)) == 0
    rows = table(out)
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"], rows
    pruned = rows[2]
    assert pruned["flags"] == "--learning_rate 5.0" and pruned["note"] == "pruned at step 1"
    assert float(pruned["value"]) > 5 * min(float(r["value"]) for r in rows)
    metrics = (out / "trial-002" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2  # header + step 1: the pruned run stopped at its first evaluation, its folder kept
    for name in ("best.yaml", "trials.md", "optimization_history.png", "param_importances.png", "test/metrics.json"):
        assert (out / name).is_file(), name
    best = min(rows, key=lambda r: float(r["value"]))
    assert best["flags"] == "--learning_rate 0.01"

    again = tmp_path / "again"
    assert main(["finetune", "adapter_v2", "--config", str(out / "best.yaml"), "--out_dir", str(again)]) == 0
    ours, theirs = (torch.load(d / ADAPTER, weights_only=True) for d in (again, out / best["run"]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # the same command again: the study holds its 3 trials, nothing runs
    assert main(sweep_args(small_checkpoint, alpaca64, out, "--n_trials", 3)) == 0
    assert len(table(out)) == 3 and "holds 3 trials already" in capsys.readouterr().err


def test_a_killed_sweep_resumes_in_the_same_study(small_checkpoint, alpaca64, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(small_checkpoint, alpaca64, out, "--n_trials", 3, "--heartbeat_seconds", 1, "--test", "false",
                      "--max_steps", 40)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "littune.cli", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "trial-001" / "metrics.csv").is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "trial-001").is_dir()
    time.sleep(2.5)  # past the grace period: trial 1's heartbeat is stale
    assert main(args) == 0
    trials = study_trials(out)
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 1 and states[1] == "FAIL", states
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params and retry.number > 1
    assert "rerun of trial 1" in next(r["note"] for r in table(out) if r["trial"] == str(retry.number))


def test_two_processes_share_one_sqlite_study(small_checkpoint, alpaca64, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(small_checkpoint, alpaca64, out, "--n_trials", 6, "--test", "false")
    out.mkdir()
    assert main(["sweep", "adapter_v2", "--checkpoint_dir", str(small_checkpoint), "--data_dir", str(alpaca64),
                 "--out_dir", str(out), "--search", SPACE, *FAST, "--n_trials", "1", "--test", "false"]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [subprocess.Popen([sys.executable, "-m", "littune.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    trials = study_trials(out)
    workers = {t.user_attrs["worker"] for t in trials[1:]}
    assert len(workers) == 2  # both processes ran trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and 6 <= len(trials) <= 7
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert {t.user_attrs["run"] for t in trials} == {f"trial-{n:03d}" for n in numbers}
    assert all((out / f"trial-{n:03d}" / "metrics.csv").is_file() for n in numbers)


@pytest.mark.parametrize("flags,fragment", [
    (["--search", "{learning_rate: [1e-4"], "--search: not JSON or YAML"),
    (["--search", '{"learning_rat": [0.1, 0.2]}'], "'learning_rat' is not a flag of littune finetune"),
    (["--search", '{"learning_rate": [0.1, 0.01]}'], "low 0.1 must be below high 0.01"),
    (["--search", '{"learning_rate": [-1, 1]}'], "must be > 0"),
    (["--search", '{"epochs": [1.5, 3]}'], "not an integer"),
    (["--search", '{"out_dir": ["a", "b"]}'], "out_dir cannot be searched"),
    (["--search", '{"lr_schedule": ["constant", "linear"]}'], "'linear' is not a choice"),
    (["--search", SPACE, "--n_trials", "0"], "--n_trials 0: must be >= 1"),
    (["--search", SPACE], "give --n_trials, --budget_minutes or both"),
    (["--search", SPACE, "--n_trials", "2", "--storage", "not a url"], "--storage not a url: not a database URL"),
    (["--search", SPACE, "--n_trials", "2", "--storage", "postgresql://u:secret@127.0.0.1:1/x"], "cannot open"),
])
def test_bad_input_is_one_line_and_writes_nothing(small_checkpoint, alpaca64, tmp_path, capsys, flags, fragment):
    out = tmp_path / "sweep"
    result = run_main(capsys, "sweep", "adapter_v2", "--checkpoint_dir", small_checkpoint, "--data_dir", alpaca64,
                      "--out_dir", out, *flags)
    line = one_error_line(result, fragment)
    assert "secret" not in result.stderr + result.stdout, line
    assert not out.exists() or listing(out) == set()


def test_unknown_method_is_one_line(capsys):
    one_error_line(run_main(capsys, "sweep", "prefix_tuning", "--search", SPACE), "prefix_tuning")


def test_the_space_grammar():
    import typing

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from littune.finetune import command
    from littune.sweep.space import distributions

    hints = typing.get_type_hints(command("lora"), include_extras=True)
    space = distributions({"learning_rate": [1e-4, "1e-2", "log"], "epochs": [1, 3], "lora_r": [4, 8, 16],
                           "shared_prefix": [True, False], "weight_decay": {"low": 0, "high": 0.1, "step": 0.05},
                           "lora_alpha": {"choices": [8, 32]}, "seed": 7}, hints)
    assert space["learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["epochs"] == IntDistribution(1, 3)
    assert space["lora_r"] == CategoricalDistribution([4, 8, 16])
    assert space["shared_prefix"] == CategoricalDistribution([True, False])
    assert space["weight_decay"] == FloatDistribution(0.0, 0.1, step=0.05)
    assert space["lora_alpha"] == CategoricalDistribution([8, 32]) and space["seed"] == ("fixed", 7)


def test_the_budget_stops_a_running_trial_at_its_next_evaluation(small_checkpoint, alpaca64, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(sweep_args(small_checkpoint, alpaca64, out, "--n_trials", 3, "--budget_minutes", 0.0001))
    rows = table(out)
    assert [(r["state"], r["note"]) for r in rows] == [("pruned", "stopped by --budget_minutes at step 1")], rows
    assert len((out / "trial-000" / "metrics.csv").read_text().splitlines()) == 2  # header + step 1 of 4
    assert code == 0 and "no completed trial yet: no best.yaml" in capsys.readouterr().err
