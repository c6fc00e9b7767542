"""What `littune serve` and `littune generate` take from files and clients (issue 36): a served adapter is read once
and owned by the process, a run folder's hyperparameters.yaml is checked before use, a client's unknown model name
is echoed at most 100 characters long."""

import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from conftest import free_port, make_adapter_run, one_error_line, run_main
from serving import PROMPTS, chat, client_for, wait_healthy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_served_adapters_are_owned_a_changed_or_truncated_file_changes_nothing(small_checkpoint, tmp_path):
    """Issue 36 #1, through the real command and the openai client: once the server is up, adapter a's file
    overwritten in place with b's weights (same inode), then truncated to 0 bytes: a still answers as before (it
    answered as b, then the process died of SIGBUS), and the server stays up; an unknown 1 MB model name gets a
    short 404."""
    runs = {name: make_adapter_run(small_checkpoint, tmp_path / name, "lora", seed=seed, lora_r=4, lora_dropout=0.0)
            for name, seed in (("a", 0), ("b", 1))}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "littune.cli", "serve", "--checkpoint_dir", str(small_checkpoint), "--port", str(port),
         "--adapter", f"a={runs['a']}", "--adapter", f"b={runs['b']}", "--log_level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process)
        client = client_for(base, "none")
        first = {name: chat(client, PROMPTS[0], model=name)[0] for name in runs}
        assert first["a"] != first["b"]  # the two adapters answer differently
        file_a = runs["a"] / "lit_model_lora_finetuned.pth"
        inode = file_a.stat().st_ino
        shutil.copyfile(runs["b"] / "lit_model_lora_finetuned.pth", file_a)  # rewritten in place
        assert file_a.stat().st_ino == inode
        assert chat(client, PROMPTS[0], model="a")[0] == first["a"]
        os.truncate(file_a, 0)
        assert chat(client, PROMPTS[0], model="a")[0] == first["a"]
        assert chat(client, PROMPTS[0], model="b")[0] == first["b"]
        assert process.poll() is None and httpx.get(f"{base}/health").status_code == 200

        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "x" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 404 and len(response.content) < 1000, len(response.content)
        message = response.json()["error"]["message"]
        assert "x" * 100 in message and "1,000,000 characters" in message and "a, b" in message
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("command", ["generate", "serve", "evaluate"])
def test_a_crafted_hyperparameters_yaml_is_one_line_naming_the_field(command, small_checkpoint, alpaca64, tmp_path,
                                                                     capsys):
    """Issue 36 #5: a run folder's hyperparameters.yaml with a flag of the wrong type (a rank "8", a list, targets
    5, an alpha as text) or not a mapping at all: one `littune: error:` line naming the file and the field, in every
    command that loads a run (they were tracebacks from inside litgpt)."""
    run = make_adapter_run(small_checkpoint, tmp_path / "run", "lora", lora_r=4, lora_dropout=0.0)
    path = run / "hyperparameters.yaml"
    good = yaml.safe_load(path.read_text())
    flags = {"generate": ["generate", "--prompt", "Hi", "--max_new_tokens", 1, "--adapter_path", run],
             "serve": ["serve", "--port", free_port(), "--adapter", f"a={run}"],
             "evaluate": ["evaluate", "--adapter_path", run, "--data_dir", alpaca64, "--out_dir", tmp_path / "eval"]}
    for change, field in (({"lora_r": "8"}, "lora_r"), ({"lora_r": [8]}, "lora_r"), ({"lora_targets": 5},
                          "lora_targets"), ({"lora_alpha": "sixteen"}, "lora_alpha"), ({"method": ["lora"]}, "method")):
        path.write_text(yaml.dump({**good, **change}))
        result = run_main(capsys, *flags[command], "--checkpoint_dir", small_checkpoint)
        one_error_line(result, f"{path}: {field} ")
    path.write_text(yaml.dump([good]))
    one_error_line(run_main(capsys, *flags[command], "--checkpoint_dir", small_checkpoint), f"{path}: holds a list")
    assert not (tmp_path / "eval").exists()
