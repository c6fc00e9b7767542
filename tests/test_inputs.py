"""A run's inputs are read once (littune/inputs.py): one checkpoint walked through finetune, evaluate and serve, each
by the real CLI in this process, has its model config and its tokenizer loaded once per command, and an adapter's
run folder read once; the inference side's prompt style comes from prompts.py with the tokenizer it already has."""

import json
import shutil

import pytest

from conftest import finetune_argv, free_port, make_adapter_run
from serving import CHATML
from littune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def loads(monkeypatch) -> dict:
    """Counters of litgpt's config loader, litgpt's Tokenizer constructor and littune's reader of a run folder's
    hyperparameters.yaml, patched where every caller reaches them."""
    import litgpt

    from littune import model

    counts = {"config": 0, "tokenizer": 0, "run folder": 0}
    from_file, tokenizer_init, read_run = litgpt.Config.from_file.__func__, litgpt.Tokenizer.__init__, model.read_run

    def counted_from_file(cls, *args, **kwargs):
        counts["config"] += 1
        return from_file(cls, *args, **kwargs)

    def counted_tokenizer(self, *args, **kwargs):
        counts["tokenizer"] += 1
        return tokenizer_init(self, *args, **kwargs)

    def counted_read_run(*args, **kwargs):
        counts["run folder"] += 1
        return read_run(*args, **kwargs)

    monkeypatch.setattr(litgpt.Config, "from_file", classmethod(counted_from_file))
    monkeypatch.setattr(litgpt.Tokenizer, "__init__", counted_tokenizer)
    monkeypatch.setattr(model, "read_run", counted_read_run)
    return counts


def taken(counts: dict) -> dict:
    """The counts so far, and the counters back at 0."""
    seen = dict(counts)
    counts.update({k: 0 for k in counts})
    return seen


def test_finetune_evaluate_and_serve_load_the_config_and_the_tokenizer_once_each(small_checkpoint, alpaca64, tmp_path,
                                                                                 loads, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    from littune import serve

    run = tmp_path / "run"
    assert main(finetune_argv(small_checkpoint, alpaca64, run, "--max_steps", "1", "--micro_batch_size", "2",
                              "--eval_interval", "1", "--eval_iters", "1", "--precision", "32-true")) == 0
    assert taken(loads) == {"config": 1, "tokenizer": 1, "run folder": 0}

    assert main(["evaluate", "--checkpoint_dir", str(small_checkpoint), "--data_dir", str(alpaca64), "--adapter_path",
                 str(run), "--max_new_tokens", "2"]) == 0
    assert taken(loads) == {"config": 1, "tokenizer": 1, "run folder": 1}

    answers = []

    class OneRequest:  # instead of uvicorn: the app itself, asked once, then "stopped"
        def __init__(self, app, service):
            self.app, self.service = app, service

        def run(self, sockets):
            with TestClient(self.app, base_url="http://127.0.0.1:8000") as client:
                response = client.post("/v1/chat/completions", json={
                    "model": "a" if "a" in self.service.models else "m", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 2})
            answers.append(response.status_code)

    monkeypatch.setattr(serve, "make_server", lambda app, service, log_level: OneRequest(app, service))
    assert main(["serve", "--checkpoint_dir", str(small_checkpoint), "--adapter_path", str(run), "--port",
                 str(free_port())]) == 0
    assert answers == [200]
    assert taken(loads) == {"config": 1, "tokenizer": 1, "run folder": 1}

    # a model with a chat template and named adapters: the chat style of each is built with the one tokenizer
    chat = tmp_path / "tiny-chat"
    shutil.copytree(small_checkpoint, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    plain = make_adapter_run(chat, tmp_path / "plain-run", "lora", style="chat", lora_r=2)
    taken(loads)
    (plain / "prompt_style.yaml").unlink()  # served in the model's own template, as a run without a style is
    assert main(["serve", "--checkpoint_dir", str(chat), "--adapter", f"a={plain}", "--adapter", f"b={run}",
                 "--port", str(free_port())]) == 0
    assert answers == [200, 200]
    assert taken(loads) == {"config": 1, "tokenizer": 1, "run folder": 2}
