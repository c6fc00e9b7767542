"""What leaves the machine (issue 36, findings 2 and 3): experiment loggers get the run's flags without credentials
or absolute paths (read back from TensorBoard's and W&B's own files), W&B logs offline unless WANDB_MODE or an API
key says otherwise, and a W&B that cannot start fails before anything is written."""

import pytest

from conftest import assert_clean_error, finetune_argv, listing, run_main
from littune.finetune.logs import wandb_mode
from littune.outbound import outbound, redacted

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PASSWORD = "s3cretPW"
URI = f"https://alice:{PASSWORD}@mlflow.example.com"


def finetune(checkpoint, data, out, *flags) -> list[str]:
    return finetune_argv(checkpoint, data, out, "--max_steps", "2", "--micro_batch_size", "2", "--batch_size", "2",
                         "--eval_interval", "100", "--precision", "32-true", *flags)


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def files_bytes(folder) -> bytes:
    """Every file a logger wrote under folder, but W&B's own debug logs (local; `wandb sync` uploads the run)."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("debug"))


def test_loggers_get_no_credentials_and_no_local_paths(small_checkpoint, alpaca64, tmp_path, capsys, no_wandb_key):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = run_main(capsys, *finetune(small_checkpoint, alpaca64, out, "--logger", "[csv, tensorboard, wandb]",
                                        "--mlflow_tracking_uri", URI))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wandb: offline" in result.stdout  # no key, no WANDB_MODE: offline, said in the header
    assert list((out / "wandb").glob("offline-run-*"))
    logged = files_bytes(out / "tensorboard") + files_bytes(out / "wandb")
    assert b"adapter_v2" in logged and b"mlflow.example.com" in logged  # the flags are there ...
    assert PASSWORD.encode() not in logged  # ... without the password
    for place in (small_checkpoint, alpaca64, out):
        assert str(place.parent).encode() not in logged, place  # nor where this machine keeps things
    # hyperparameters.yaml stays local and keeps what a resume needs
    assert str(alpaca64) in (out / "hyperparameters.yaml").read_text()


def test_wandb_online_without_a_key_fails_before_anything_is_written(small_checkpoint, alpaca64, tmp_path, capsys,
                                                                     no_wandb_key, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    out = tmp_path / "run"
    result = run_main(capsys, *finetune(small_checkpoint, alpaca64, out, "--logger", "[csv, wandb]"))
    assert_clean_error(result, "WANDB_MODE=online needs an API key", "wandb login")
    assert not out.exists() or listing(out) == set()


def test_wandb_mode_follows_the_environment(monkeypatch, tmp_path, no_wandb_key):
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "online"


def test_the_filter():
    values = outbound({"mlflow_tracking_uri": URI, "data_dir": "/home/alice/data/sst2", "out_dir": "out/run",
                       "store": "postgresql://bob:pw@db:5432/x", "hook": "https://h/x?token=abc&page=2",
                       "logger": ["csv", "/tmp/x"], "learning_rate": 0.001, "resume": None,
                       "mlruns": "file:///home/alice/mlruns", "windows": "C:\\Users\\alice\\data"})
    assert values == {"mlflow_tracking_uri": "https://***@mlflow.example.com", "data_dir": "sst2",
                      "out_dir": "out/run", "store": "postgresql://***@db:5432/x", "hook": "https://h/x?token=***&page=2",
                      "logger": ["csv", "x"], "learning_rate": 0.001, "resume": None, "mlruns": "mlruns",
                      "windows": "data"}
    assert redacted(f"cannot open {URI}: refused") == "cannot open https://***@mlflow.example.com: refused"
