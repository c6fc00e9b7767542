"""`littune generate`: exact greedy decoding, parity with transformers, adapters, seeds, prompt style, errors."""

import json
from pathlib import Path

import pytest
import torch

from conftest import ALPACA_335, finetune_argv, make_hf_checkpoint, one_error_line, run_cli, run_main
from littune import generate as generate_module
from littune.cli import main
from littune.methods.adapter_v2 import METHOD
from littune.inputs import load_for_inference
from littune.sampling import generate_tokens

ADAPTER_FILE = METHOD.adapter_file

PROMPT, INPUT = "Give three tips for staying healthy.", ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, the transformers model it was written from)."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-neox"
    hf_model = make_hf_checkpoint(folder, "gpt_neox", num_hidden_layers=4, seed=1)
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    return folder, hf_model


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory) -> Path:
    """A short adapter_v2 run on real Alpaca records."""
    checkpoint, _ = tiny
    folder = tmp_path_factory.mktemp("run")
    source = folder / "alpaca.json"
    source.write_text(json.dumps(json.loads(ALPACA_335.read_text())[:40]))
    assert main(["prepare", "--data_file", str(source), "--checkpoint_dir", str(checkpoint), "--destination_path",
                 str(folder / "data"), "--test_size", "4", "--max_seq_length", "128"]) == 0
    assert main(finetune_argv(checkpoint, folder / "data", folder / "out", "--max_steps", "6", "--batch_size", "4",
                              "--micro_batch_size", "4", "--learning_rate", "0.03", "--warmup_steps", "0",
                              "--eval_interval", "100", "--save_interval", "100")) == 0
    return folder / "out"


def answer(checkpoint, *flags, capsys=None) -> str:
    answers = generate_module.generate(prompt=PROMPT, checkpoint_dir=checkpoint, **dict(flags))
    return answers[0]


def argmax_loop(model, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids: set) -> list:
    """The plainest greedy decoder: a full forward pass over everything so far, argmax of the last position."""
    ids = prompt_ids.tolist()
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token in stop_ids:
                break
            ids.append(token)
            new.append(token)
    return new


@pytest.mark.parametrize("with_adapter", [False, True])
def test_kv_cached_greedy_equals_full_forward_argmax(tiny, run_dir, with_adapter):
    import lightning as L
    from litgpt.prompts import Alpaca

    checkpoint, _ = tiny
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model, tokenizer, _ = load_for_inference(fabric, checkpoint, run_dir if with_adapter else None)
    prompt_ids = tokenizer.encode(Alpaca().apply(PROMPT, input=INPUT))
    cached = list(generate_tokens(model, prompt_ids, 24, temperature=0.0, stop_tokens=([tokenizer.eos_id],)))
    plain = argmax_loop(model, prompt_ids, 24, {tokenizer.eos_id})
    assert cached == plain and len(cached) > 0


def test_base_model_greedy_equals_transformers_generate(tiny):
    from litgpt import Tokenizer
    from litgpt.prompts import Alpaca

    checkpoint, hf_model = tiny
    tokenizer = Tokenizer(checkpoint)
    prompt_ids = tokenizer.encode(Alpaca().apply(PROMPT, input=INPUT))
    with torch.no_grad():
        hf_out = hf_model.generate(prompt_ids[None].long(), max_new_tokens=20, do_sample=False,
                                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    hf_new = hf_out[0, len(prompt_ids):].tolist()
    if tokenizer.eos_id in hf_new:
        hf_new = hf_new[:hf_new.index(tokenizer.eos_id)]
    ours = generate_module.generate(prompt=PROMPT, checkpoint_dir=checkpoint, temperature=0, max_new_tokens=20)[0]
    assert ours == tokenizer.decode(torch.tensor(hf_new))


def test_cli_streams_answer_to_stdout_and_timings_to_stderr(tiny, run_dir):
    checkpoint, _ = tiny
    result = run_cli("generate", "--prompt", PROMPT, "--checkpoint_dir", str(checkpoint), "--adapter_path",
                     str(run_dir), "--temperature", "0", "--max_new_tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = generate_module.generate(prompt=PROMPT, checkpoint_dir=checkpoint, adapter_path=run_dir,
                                        temperature=0, max_new_tokens=12)[0]
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "tokens/s" not in result.stdout


def test_adapter_changes_the_answer_and_run_dir_equals_file(tiny, run_dir):
    checkpoint, _ = tiny
    greedy = dict(prompt=PROMPT, checkpoint_dir=checkpoint, temperature=0, max_new_tokens=16)
    base = generate_module.generate(**greedy)[0]
    tuned = generate_module.generate(adapter_path=run_dir, **greedy)[0]
    tuned_file = generate_module.generate(adapter_path=run_dir / ADAPTER_FILE, **greedy)[0]
    assert tuned != base
    assert tuned == tuned_file


def test_same_seed_same_samples(tiny, run_dir):
    checkpoint, _ = tiny
    sampled = dict(prompt=PROMPT, checkpoint_dir=checkpoint, adapter_path=run_dir, temperature=1.0, top_k=50,
                   top_p=0.9, max_new_tokens=16, num_samples=2)
    a = generate_module.generate(seed=1, **sampled)
    b = generate_module.generate(seed=1, **sampled)
    c = generate_module.generate(seed=2, **sampled)
    assert a == b and a != c and a[0] != a[1]


def test_prompt_sent_is_the_prompt_styles_text(tiny, run_dir, monkeypatch):
    from litgpt import Tokenizer
    from litgpt.prompts import Alpaca

    checkpoint, _ = tiny
    seen = []
    original = generate_module.generate_tokens

    def spy(model, prompt_ids, *args, **kwargs):
        seen.append(prompt_ids.tolist())
        return original(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_tokens", spy)
    generate_module.generate(prompt="Classify the sentiment.", input="I loved it", checkpoint_dir=checkpoint,
                             adapter_path=run_dir, temperature=0, max_new_tokens=4)
    expected = Alpaca().apply("Classify the sentiment.", input="I loved it")
    assert "### Input:\nI loved it" in expected
    assert seen == [Tokenizer(checkpoint).encode(expected).tolist()]


def test_bad_input_gives_one_clear_line(tiny, run_dir, tmp_path, capsys):
    checkpoint, _ = tiny

    def run(*flags):
        return run_main(capsys, "generate", "--checkpoint_dir", str(checkpoint), *flags)

    one_error_line(run("--prompt", "hi", "--adapter_path", str(tmp_path / "nope.pth")), "nope.pth")
    one_error_line(run("--prompt", "   "), "--prompt is empty")
    one_error_line(run("--prompt", "hi", "--max_new_tokens", "1000"), "exceeds", "256")

    # an adapter trained on another model: a wider tiny model's adapter does not fit this one
    other = tmp_path / "wide"
    make_hf_checkpoint(other, "gpt_neox", num_hidden_layers=4, hidden_size=96)
    assert main(["convert", "--checkpoint_dir", str(other)]) == 0
    from littune.checkpoints import load_model_config

    wide = METHOD.build_model(load_model_config(other), METHOD.args())
    foreign = {k: v for k, v in wide.state_dict().items() if METHOD.is_trainable(k)}
    torch.save(foreign, tmp_path / "foreign.pth")
    result = run("--prompt", "hi", "--adapter_path", str(tmp_path / "foreign.pth"))
    one_error_line(result, "not an adapter for", "shapes differ")


def test_a_tiny_temperature_answers_as_greedy(tiny):
    checkpoint, _ = tiny
    settings = dict(prompt=PROMPT, checkpoint_dir=checkpoint, max_new_tokens=12)
    assert generate_module.generate(temperature=1e-45, **settings) == \
        generate_module.generate(temperature=0, **settings)
