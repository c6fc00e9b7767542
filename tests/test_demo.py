"""The whole workflow end to end: `littune demo` in a subprocess, as a new user runs it."""

import csv

import torch

from conftest import run_cli


def test_demo_runs_the_whole_workflow(tmp_path):
    workdir = tmp_path / "demo"
    result = run_cli("demo", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    # each step is announced with the command that does it by hand, in workflow order
    commands = ["$ littune convert", "$ littune prepare", "$ littune finetune adapter_v2", "$ littune generate"]
    positions = [out.index(c) for c in commands]
    assert positions == sorted(positions)

    checkpoint = workdir / "checkpoints" / "littune" / "demo-neox"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lit_model.pth", "model_config.yaml"):
        assert (checkpoint / name).is_file(), name
    data = workdir / "data" / "demo"
    train = torch.load(data / "train.pt", weights_only=True)
    test = torch.load(data / "test.pt", weights_only=True)
    val = torch.load(data / "val.pt", weights_only=True)
    assert len(train) + len(val) + len(test) == 96 and len(test) == 8 and len(val) >= 1
    assert (data / "prepare.json").is_file() and (data / "prompt_style.yaml").is_file()
    run = workdir / "out" / "adapter_v2" / "demo"
    adapter = torch.load(run / "lit_model_adapter_finetuned.pth", weights_only=True)
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert (run / "hyperparameters.yaml").is_file() and (run / "prompt_style.yaml").is_file()

    with open(run / "metrics.csv") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 100 and losses[-1] < losses[0] - 1.0

    # generate printed an answer (the adapter's is made of the demo's words), and the summary names every output
    tuned_answer = out.split("5. Answer with the trained adapter")[1].split("\n")[2]
    assert tuned_answer.strip()
    assert "opposite" in tuned_answer.lower()
    for label in ("checkpoint", "prepared data", "adapter", "training log"):
        assert label in out.split("Outputs:")[1]
