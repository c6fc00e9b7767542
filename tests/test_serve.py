"""`littune serve`: OpenAI-compatible answers equal `littune generate`'s, batching, limits, errors, keys, shutdown.

The real command runs in a subprocess (`littune serve ...`, started with the first test so that its start-up
overlaps the others, stopped with Ctrl-C by the last); the answers are checked on servers in this process (uvicorn
on a thread over the same app), where the engine can also be looked into.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from littune import generate as generate_module
from littune import serve as serve_module
from littune.serve import app as app_module
from littune.serve import engine as engine_module
from littune.serve import protocol as protocol_module
from littune.serve.engine import End, Text
from conftest import finetune_argv, free_port, make_adapter_run, one_error_line, run_main
from serving import CHATML, KEY, MAX_TOKENS, PROMPTS, chat, client_for, in_process_server, wait_healthy
from littune.cli import main


@functools.cache  # each call loads the model: the tests ask for some answers more than once
def greedy(checkpoint, prompt, adapter_path=None) -> str:
    """`littune generate --temperature 0`'s answer."""
    return generate_module.generate(prompt=prompt, checkpoint_dir=checkpoint, adapter_path=adapter_path,
                                    temperature=0, max_new_tokens=MAX_TOKENS)[0]


# ------------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module", autouse=True)
def cli_server(small_checkpoint):
    """`littune serve` in a subprocess, the key from LITTUNE_API_KEY; stopped with Ctrl-C (SIGINT) by the last test.
    Tests call `up(cli_server)` once they need it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "littune.cli", "serve", "--checkpoint_dir", str(small_checkpoint), "--port", str(port),
         "--allowed_hosts", "proxy.example.com"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LITTUNE_API_KEY": KEY, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def up(cli_server) -> str:
    base, process = cli_server
    wait_healthy(base, process)
    return base


@pytest.fixture(scope="module")
def server(small_checkpoint):
    """The base model with the default limits and a key."""
    with in_process_server(small_checkpoint, api_key=KEY) as (base, _):
        yield base


@pytest.fixture(scope="module")
def chat_checkpoint(small_checkpoint, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with a ChatML chat template."""
    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(small_checkpoint, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHATML}))
    return folder


@pytest.fixture(scope="module")
def adapter_run(small_checkpoint, alpaca64, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(finetune_argv(small_checkpoint, alpaca64, out, "--max_steps", "2", "--batch_size", "4",
                              "--micro_batch_size", "4", "--learning_rate", "0.03", "--warmup_steps", "0",
                              "--eval_interval", "100", "--save_interval", "100")) == 0
    return out


# -------------------------------------------------------------------------------------- answers and sampling


def test_answers_equal_littune_generate_streamed_or_not(server, small_checkpoint):
    expected = greedy(small_checkpoint, PROMPTS[0])
    assert expected  # the tiny model says something within MAX_TOKENS
    client = client_for(server)
    text, reason, usage = chat(client, PROMPTS[0])
    assert text == expected
    streamed, stream_reason, stream_usage = chat(client, PROMPTS[0], stream=True)
    assert streamed == expected and stream_reason == reason
    assert usage.prompt_tokens == stream_usage.prompt_tokens > 10  # the Alpaca-formatted prompt
    assert usage.completion_tokens == stream_usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # /v1/completions continues the raw text: given the text littune generate prompts with, its answer
    from litgpt.prompts import Alpaca

    raw = client.completions.create(model="m", prompt=Alpaca().apply(PROMPTS[1]), max_tokens=MAX_TOKENS,
                                    temperature=0)
    assert raw.choices[0].text == greedy(small_checkpoint, PROMPTS[1]) != expected
    pieces = [c.choices[0].text for c in client.completions.create(
        model="m", prompt=Alpaca().apply(PROMPTS[1]), max_tokens=MAX_TOKENS, temperature=0, stream=True)]
    assert "".join(pieces) == raw.choices[0].text

    # a one-message chat in a litgpt style: instruction + "\n\n" + input, as littune prepares and exports it
    instruction, input = "Classify the sentiment.", "a gorgeous, witty film"
    with_input = generate_module.generate(prompt=instruction, input=input, checkpoint_dir=small_checkpoint,
                                          temperature=0, max_new_tokens=MAX_TOKENS)[0]
    text, _, usage_with_input = chat(client, f"{instruction}\n\n{input}")
    from littune.prepared import encode, load_tokenizer

    prompt_ids = encode(load_tokenizer(small_checkpoint), Alpaca().apply(instruction, input=input))
    assert text == with_input and usage_with_input.prompt_tokens == len(prompt_ids)

    models = client.models.list().data
    assert [m.id for m in models] == [small_checkpoint.name]


def test_four_concurrent_requests_are_batched_and_each_equals_its_own_answer(server, small_checkpoint):
    expected = [greedy(small_checkpoint, p) for p in PROMPTS]
    client = client_for(server)
    with ThreadPoolExecutor(4) as pool:  # different prompt lengths: rows at different positions in one batch
        answers = list(pool.map(lambda i: chat(client, PROMPTS[i], stream=i % 2 == 1)[0], range(4)))
    assert answers == expected


def test_temperature_top_p_top_k_and_seed(server, small_checkpoint):
    """A seeded sampled answer equals `littune generate --seed` with the same settings (the same draws); temperature
    omitted is 1.0, as OpenAI's API (litgpt's server reads 0 as unset, littune does not)."""
    client = client_for(server)
    settings = dict(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    expected = generate_module.generate(prompt=PROMPTS[0], checkpoint_dir=small_checkpoint,
                                        max_new_tokens=MAX_TOKENS, **settings)[0]
    sampled = chat(client, PROMPTS[0], temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 50})[0]
    assert sampled == expected != greedy(small_checkpoint, PROMPTS[0])
    assert chat(client, PROMPTS[0], stream=True, temperature=0.9, top_p=0.9, seed=7,
                extra_body={"top_k": 50})[0] == expected

    default_temperature = generate_module.generate(prompt=PROMPTS[0], checkpoint_dir=small_checkpoint,
                                                   max_new_tokens=MAX_TOKENS, temperature=1.0, top_k=None, seed=3)[0]
    response = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=MAX_TOKENS, seed=3)
    assert response.choices[0].message.content == default_temperature

    # stop strings end the text before them
    full = greedy(small_checkpoint, PROMPTS[2])
    stop = full[len(full) // 2:][:3]
    assert stop and len(full) >= 4
    cut, reason, _ = chat(client, PROMPTS[2], stop=[stop])
    assert cut == full[:full.index(stop)] and reason == "stop"
    assert chat(client, PROMPTS[2], stream=True, stop=stop)[0] == cut


# ----------------------------------------------------------------------------------- chat template, adapter


def test_chat_template_renders_conversations_and_key_is_required(chat_checkpoint, capsys):
    import lightning as L
    from littune.prompts import style_by_name
    from littune.inputs import load_for_inference
    from littune.sampling import generate_tokens

    with in_process_server(chat_checkpoint, api_key=KEY, max_concurrency=1, max_queue=1) as (base, service):
        client = client_for(base)
        expected = greedy(chat_checkpoint, PROMPTS[3])  # generate picks the chat template too
        assert chat(client, PROMPTS[3])[0] == chat(client, PROMPTS[3], stream=True)[0] == expected

        conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi."},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": PROMPTS[1]}]
        style = style_by_name("chat", chat_checkpoint)
        text = style.render(conversation, add_generation_prompt=True)
        assert text.count("<|im_start|>") == 5 and text.endswith("<|im_start|>assistant\n")
        model, tokenizer, _ = load_for_inference(L.Fabric(devices=1, accelerator="cpu", precision="32-true"),
                                                 chat_checkpoint)
        prompt_ids = tokenizer.encode(text)
        tokens = list(generate_tokens(model, prompt_ids, MAX_TOKENS, temperature=0.0,
                                      stop_tokens=style.stop_tokens(tokenizer)))
        answer, _, usage = chat(client, conversation)
        assert answer == tokenizer.decode(torch.tensor(tokens)) and usage.prompt_tokens == len(prompt_ids)

        # the key: 401 without it or with another one, everywhere but /health
        for bad in (None, "sk-wrong"):
            headers = {"Authorization": f"Bearer {bad}"} if bad else {}
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/v1/completions")):
                response = httpx.request(method, base + path, headers=headers, json={"prompt": "x"})
                assert response.status_code == 401, (bad, path)
                assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            chat(client_for(base, "sk-wrong"), PROMPTS[3])
        assert httpx.get(base + "/health").status_code == 200
    assert KEY not in capsys.readouterr().err


def test_adapter_run_is_served_with_its_prompt_style(small_checkpoint, adapter_run):
    with in_process_server(small_checkpoint, adapter_run) as (base, service):
        client = client_for(base, "anything")  # no key set: any key is accepted
        expected = greedy(small_checkpoint, PROMPTS[0], adapter_path=adapter_run)
        assert chat(client, PROMPTS[0])[0] == chat(client, PROMPTS[0], stream=True)[0] == expected
        assert expected != greedy(small_checkpoint, PROMPTS[0])  # the adapter is really applied
        assert client.models.list().data[0].id == f"{small_checkpoint.name}+{adapter_run.name}"
        # the run's style is Alpaca: one instruction, no conversation
        with pytest.raises(openai.BadRequestError, match="chat template"):
            chat(client, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}])


def test_many_adapters_on_one_base_through_the_real_command(small_checkpoint, adapter_run, tmp_path, capsys):
    """Issue 27 #1, `littune serve --adapter sst=RUN --adapter rev=RUN` as written: a LoRA run (its prompt style
    phi-2) and an adapter_v2 run (alpaca) on one base. /v1/models lists the base under its folder's name and each
    adapter under its NAME; concurrent requests for all three, streamed or not, answer as `littune generate
    --adapter_path` of that adapter (in its run's prompt style); another name gets OpenAI's 404 model_not_found."""
    lora = make_adapter_run(small_checkpoint, tmp_path / "sst-run", "lora", seed=3, style="phi-2", lora_r=4,
                            lora_dropout=0.0)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "littune.cli", "serve", "--checkpoint_dir", str(small_checkpoint), "--port", str(port),
         "--adapter", f"sst={lora}", "--adapter", f"rev={adapter_run}", "--log_level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        runs = {small_checkpoint.name: None, "sst": lora, "rev": adapter_run}
        expected = {(name, prompt): greedy(small_checkpoint, prompt, adapter_path=run)  # while the server starts
                    for name, run in runs.items() for prompt in PROMPTS[:2]}
        assert len({expected[name, PROMPTS[0]] for name in runs}) == 3  # each adapter answers differently
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process)
        client = client_for(base, "none")
        assert [m.id for m in client.models.list().data] == list(runs)
        requests = [(name, prompt, stream) for name, prompt in expected for stream in (False, True)]
        with ThreadPoolExecutor(len(requests)) as pool:  # 12 at once: 4 decoded, the others waiting
            answers = list(pool.map(lambda r: chat(client, r[1], stream=r[2], model=r[0]), requests))
        assert [text for text, _, _ in answers] == [expected[name, prompt] for name, prompt, _ in requests]
        prompt_tokens = {name: usage.prompt_tokens for (name, prompt, _), (_, _, usage) in zip(requests, answers)
                         if prompt == PROMPTS[0]}
        assert prompt_tokens["sst"] != prompt_tokens["rev"] == prompt_tokens[small_checkpoint.name]  # phi-2, alpaca

        with pytest.raises(openai.NotFoundError) as missing:
            chat(client, PROMPTS[0], model="m")
        assert missing.value.code == "model_not_found" and "sst" in missing.value.message
        response = httpx.post(f"{base}/v1/completions", json={"model": "rev", "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 200 and response.json()["model"] == "rev"
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in err, err[-3000:]

    # flag errors: one line each, before any model is loaded
    capsys.readouterr()  # generate's timing lines
    flags = ["serve", "--checkpoint_dir", str(small_checkpoint), "--port", str(free_port())]
    foreign = tmp_path / "foreign-run"
    shutil.copytree(adapter_run, foreign, ignore=shutil.ignore_patterns("step-*", "best"))
    torch.save({"transformer.h.0.attn.adapter_wte.weight": torch.zeros(3, 3)},
               foreign / "lit_model_adapter_finetuned.pth")
    for extra, message in (
        (["--adapter", "sst"], "--adapter sst: give NAME=PATH"),
        (["--adapter", "a b=x"], "must be letters, digits"),
        (["--adapter", f"a={lora}", "--adapter", f"a={adapter_run}"], "'a' is given twice"),
        (["--adapter", f"{small_checkpoint.name}={lora}"], "the base model's name"),
        (["--adapter", f"a={tmp_path / 'nowhere'}"], f"--adapter a={tmp_path / 'nowhere'}: no such file"),
        (["--adapter", f"a={foreign}"], "not an adapter for"),
        (["--adapter", f"a={lora}", "--adapter_path", str(lora)], "--adapter_path and --adapter"),
    ):
        one_error_line(run_main(capsys, *flags, *extra), message, code=1, alone=True)


# ------------------------------------------------------------------------- limits, disconnects, bad requests


def test_queue_limit_429_and_disconnects_free_their_place(chat_checkpoint):
    """max_concurrency 1, max_queue 1: one running, one waiting, the third gets 429 with Retry-After; clients that
    disconnect (one running, one waiting) leave the batch at once and the server keeps answering."""
    with in_process_server(chat_checkpoint, max_concurrency=1, max_queue=1) as (base, service):
        jobs = []
        submit = service.engine.submit

        def recording_submit(job):  # record what the engine is asked to do and what it sends back
            events, emit = [], job.emit
            job.emit = lambda event: (events.append(event), emit(event))
            jobs.append((job, events))
            submit(job)

        service.engine.submit = recording_submit
        long = {"messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0, "stream": True,
                "ignore_eos": True}  # no max_tokens: the whole context
        with httpx.Client(base_url=base, timeout=60) as first, httpx.Client(base_url=base, timeout=60) as second:
            with first.stream("POST", "/v1/chat/completions", json=long) as running:
                lines = running.iter_lines()
                assert running.status_code == 200
                assert '"content": ""' in next(line for line in lines if line)  # the role chunk
                assert '"content"' in next(line for line in lines if line)  # a first piece of the answer
                with second.stream("POST", "/v1/chat/completions", json=long) as waiting:
                    assert waiting.status_code == 200
                    refused = httpx.post(base + "/v1/chat/completions", json={**long, "stream": False})
                    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
                    assert refused.json()["error"]["type"] == "rate_limit_error"
        # both clients have gone mid-answer: the engine drops them without finishing
        deadline = time.monotonic() + 10
        while (service.engine.rows or service.engine.pending or service.in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not service.engine.rows and service.in_flight == 0
        assert len(jobs) == 2 and all(job.cancelled for job, _ in jobs)
        assert not any(isinstance(event, End) for _, events in jobs for event in events)  # neither ran to its end
        room = service.context - jobs[0][0].prompt.numel()
        assert sum(isinstance(event, Text) for event in jobs[0][1]) < room
        # and the next client is answered as if nothing had happened
        assert chat(client_for(base), PROMPTS[3])[0] == greedy(chat_checkpoint, PROMPTS[3])


def test_huge_prompts_are_refused_untokenised_and_the_event_loop_keeps_answering(small_checkpoint, monkeypatch):
    """Issue 24 #3: a 15 MB prompt is refused at once (it was tokenised on the event loop first: 16 s, /health
    waited as long); prompt text beyond 16 characters per token of context is never rendered or tokenised; a
    prompt being tokenised does not hold up /health; a full server answers 429 before parsing a request."""
    with in_process_server(small_checkpoint, max_concurrency=1, max_queue=0) as (base, service):
        encode, seen, gate = protocol_module.encode, [], threading.Event()

        def slow_encode(tokenizer, text):  # records what is tokenised; holds a prompt that says SLOW
            seen.append(len(text))
            if "SLOW" in text:
                gate.wait(60)
            return encode(tokenizer, text)

        monkeypatch.setattr(protocol_module, "encode", slow_encode)
        limit = 16 * service.context
        huge = "word " * (3 << 20)  # 15 MB, under the 16 MB body cap
        with httpx.Client(base_url=base, timeout=60) as http, httpx.Client(base_url=base, timeout=60) as other:
            for path, body, param in (
                ("/v1/completions", {"prompt": huge}, "prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}, "messages"),
                ("/v1/completions", {"prompt": "y" * (limit + 1)}, "prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "y"}] *
                                                        (limit + 1)}]}, "messages"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * (service.context + 1)},
                 "messages"),
            ):
                start = time.monotonic()
                refused = http.post(path, json=body)
                assert time.monotonic() - start < 5, path
                assert refused.status_code == 400, refused.text[:300]
                error = refused.json()["error"]
                assert error["param"] == param and error["code"] == "context_length_exceeded"
                assert f"{service.context}-token context" in error["message"]
            assert seen == []  # none of them was tokenised

            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(other.post, "/v1/completions", json={"prompt": "SLOW " * 20, "max_tokens": 2})
                deadline = time.monotonic() + 30
                while not seen and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert seen, "the slow prompt never reached the tokenizer"
                assert http.get("/health", timeout=5).json()["status"] == "ok"  # while it is being tokenised
                busy = http.post("/v1/completions", json={"prompt": "SLOW"}, timeout=5)  # its place is taken
                assert busy.status_code == 429 and len(seen) == 1
                gate.set()
                assert slow.result().status_code == 200
    assert service.in_flight == 0


class CharTokens:
    """A tokenizer whose tokens are characters (token id = code point)."""

    @staticmethod
    def decode(ids: torch.Tensor) -> str:
        return "".join(map(chr, ids.tolist()))


def stream_with_stops(text: str, stops: tuple) -> tuple[list[str], bool]:
    """What serve sends, piece by piece, while an answer grows by one character a token; (pieces, a stop hit)."""
    ids, emitted, pieces = [], "", []
    for k, character in enumerate(text):
        ids.append(ord(character))
        piece, emitted, hit = engine_module.advance_text(CharTokens, ids, emitted, stops, k == len(text) - 1)
        pieces.append(piece)
        if hit:
            return pieces, True
    return pieces, False


def test_stop_strings_end_the_text_at_their_first_match_and_hold_back_only_what_may_begin_one():
    """Issue 24 #5: stop strings are capped (4, of at most 256 characters) and only the text after what was sent is
    searched; checked against the plain definition on every prefix of random texts."""
    import random

    assert protocol_module.MAX_STOP_STRINGS == 4 and protocol_module.MAX_STOP_CHARS == 256
    # S, ST, STO are held back (they may begin STOP), P completes it: the first match, END is never reached
    assert stream_with_stops("say then STOP and END", ("END", "STOP")) == ([*"say then ", "", "", "", ""], True)
    assert stream_with_stops("xaaab", ("aab",)) == (["x", "", "", "a", ""], True)  # a second start inside a first
    rng = random.Random(0)
    for _ in range(300):
        stops = tuple({"".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4))})
        text = "".join(rng.choices("abc", k=rng.randint(1, 40)))
        pieces, hit = stream_with_stops(text, stops)
        # the first token that completes a stop string ends the text before the earliest match so far
        ends = [k for k in range(1, len(text) + 1) if any(s in text[:k] for s in stops)]
        expected = text[:min(text.find(s) for s in stops if s in text[:ends[0]])] if ends else text
        assert "".join(pieces) == expected and hit == bool(ends)
        for k in range(len(pieces) - 1):  # the last token ends the text: a match, or the limit (all sent)
            # after each token: all but the longest end that begins a stop string has been sent
            seen = text[:k + 1]
            held = max((n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])), default=0)
            assert "".join(pieces[:k + 1]) == seen[:len(seen) - held], (text, stops, k)


def test_bad_requests_get_openai_errors_never_500(cli_server, small_checkpoint):
    base = up(cli_server)  # the real command
    headers = {"Authorization": f"Bearer {KEY}"}
    user = [{"role": "user", "content": "hi"}]
    cases = [  # (path, raw body or JSON, param expected in the error or None)
        ("/v1/chat/completions", b'{"messages": [', None),
        ("/v1/chat/completions", b"\xff\xfe not utf-8", None),
        ("/v1/chat/completions", b"[" * 100000, None),
        ("/v1/chat/completions", [1, 2], None),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ("/v1/chat/completions", {"messages": user, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": user, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": user, "max_tokens": 1.5}, "max_tokens"),
        ("/v1/chat/completions", {"messages": user, "max_tokens": 10 ** 6}, "max_tokens"),
        ("/v1/chat/completions", {"messages": user, "max_completion_tokens": -1}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": user, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"messages": user, "temperature": 7}, "temperature"),
        ("/v1/chat/completions", {"messages": user, "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {"messages": user, "top_k": 0}, "top_k"),
        ("/v1/chat/completions", {"messages": user, "seed": "x"}, "seed"),
        ("/v1/chat/completions", {"messages": user, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": user, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/chat/completions", {"messages": user, "stop": [""]}, "stop"),
        ("/v1/chat/completions", {"messages": user, "stop": ["x", "y" * 257]}, "stop"),
        ("/v1/completions", {"prompt": "a", "stop": ["x" * 200_000] * 4}, "stop"),
        ("/v1/chat/completions", {"messages": user, "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": user, "model": 3}, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                               {"role": "user", "content": "c"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"prompt": 42}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "a", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ]
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        for path, body, param in cases:
            if isinstance(body, bytes):
                response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                response = http.post(path, json=body)
            assert response.status_code in (400, 422), (body if len(str(body)) < 200 else param, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            assert error["param"] == param, (param, error)
        for method, path, status in (("GET", "/nowhere", 404), ("GET", "/v1/chat/completions", 405)):
            response = http.request(method, path)
            assert response.status_code == status and "error" in response.json()
        # issue 24 #6 on the real command: JSON only; loopback Host names and --allowed_hosts proxy.example.com only
        plain = http.post("/v1/completions", content=json.dumps({"prompt": "hi"}),
                          headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        for host, status in (("evil.example:8000", 403), ("proxy.example.com", 200), ("localhost:1", 200)):
            response = http.get("/v1/models", headers={"Host": host})
            assert response.status_code == status, (host, response.text)
        assert http.get("/health").json()["status"] == "ok"  # still serving
    assert chat(client_for(base), PROMPTS[3])[0] == greedy(small_checkpoint, PROMPTS[3])


def test_a_web_page_cannot_drive_a_server_without_a_key(small_checkpoint):
    """Issue 24 #6 (the class of Ollama's CVE-2024-28224): a page in a browser can POST text/plain or a form to any
    site without asking, and with DNS rebinding its own name resolves to 127.0.0.1. A loopback server without a key
    answers only JSON, addressed to a loopback name or one given with --allowed_hosts."""
    with in_process_server(small_checkpoint) as (base, service):  # no key, on 127.0.0.1
        port = base.rsplit(":", 1)[1]
        body = json.dumps({"prompt": "Hi", "max_tokens": 2})
        with httpx.Client(base_url=base, timeout=60) as http:
            for media_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                               "text/plain; application/json", None):
                response = http.post("/v1/completions", content=body,
                                     headers={"Content-Type": media_type} if media_type else {})
                assert response.status_code == 415, media_type
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and "application/json" in error["message"]

            def status(host: str, method="POST", path="/v1/completions") -> int:
                return http.request(method, path, content=body, headers={
                    "Host": host, "Origin": f"http://{host}", "Content-Type": "application/json; charset=utf-8"}
                ).status_code

            for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io",
                         f"0.0.0.0:{port}", "[::2]", "proxy.example.com", "localhost:port", "[::1"):
                assert status(host) == 403, host
                assert status(host, "GET", "/health") == status(host, "GET", "/v1/models") == 403
            response = http.get("/v1/models", headers={"Host": "evil.example"})
            assert response.json()["error"]["code"] == "host_not_allowed" and "--allowed_hosts" in response.text
            for host in ("localhost", f"localhost:{port}", "LocalHost.", "127.0.0.1", f"127.0.0.5:{port}", "[::1]",
                         f"[::1]:{port}"):
                assert status(host) == 200, host

            # a reverse proxy forwards its own name: allowed by --allowed_hosts, with any port
            service.allowed_hosts = app_module.host_allowlist("127.0.0.1", "proxy.example.com, [fd00::1]")
            assert status("proxy.example.com:443") == status("[fd00::1]") == status("localhost") == 200
            assert status("evil.example") == 403
    assert app_module.host_allowlist("0.0.0.0", None) is None  # every network, no list: any Host
    assert app_module.host_allowlist("::1", None) == frozenset()


def test_setup_errors_are_one_line(cli_server, tmp_path, capsys, monkeypatch):
    base = up(cli_server)
    port = int(base.rsplit(":", 1)[1])
    missing = tmp_path / "nowhere"
    monkeypatch.delenv("LITTUNE_API_KEY", raising=False)
    # the port is taken (by the server above)
    one_error_line(run_main(capsys, "serve", "--checkpoint_dir", missing, "--port", port),
                   "cannot listen on 127.0.0.1:", "another --port", code=1, alone=True)
    # every network, no key: a warning (then the missing checkpoint's error)
    assert main(["serve", "--checkpoint_dir", str(missing), "--host", "0.0.0.0", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0" in err and "no API key" in err
    monkeypatch.setenv("LITTUNE_API_KEY", KEY)
    assert main(["serve", "--checkpoint_dir", str(missing), "--host", "0.0.0.0", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "warning" not in err and KEY not in err
    for hosts in ("proxy.example.com:8000", "a b", "", "http://x"):
        one_error_line(run_main(capsys, "serve", "--checkpoint_dir", missing, "--allowed_hosts", hosts),
                       "--allowed_hosts", "not a host name", code=1, alone=True)
    # flag ranges, and the server packages named in one line when missing
    assert main(["serve", "--checkpoint_dir", str(missing), "--port", "0"]) == 1
    assert "--port 0: must be >= 1 and <= 65535" in capsys.readouterr().err
    monkeypatch.setattr(serve_module, "_importable", lambda name: name != "uvicorn")
    assert main(["serve", "--checkpoint_dir", str(missing)]) == 1
    assert "littune serve needs uvicorn: pip install 'littune[serve]'" in capsys.readouterr().err


def test_a_tiny_temperature_fails_no_other_request(cli_server, small_checkpoint):
    """Issue 24 #2, against the real command: while one client's long greedy answer streams, another sends
    temperature 1e-45 (the logits divided by it overflow to inf, the probabilities turn to nan). Below 1e-5 a
    temperature is greedy: both are answered, the long one as `littune generate`'s."""
    base = up(cli_server)
    client = client_for(base)
    long_tokens = 160  # the prompt has 74 tokens, the context 256
    expected = generate_module.generate(prompt=PROMPTS[3], checkpoint_dir=small_checkpoint, temperature=0,
                                        max_new_tokens=long_tokens)[0]
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPTS[3]}],
                                            temperature=0, max_tokens=long_tokens, stream=True)
    pieces = []
    for chunk in stream:
        pieces += [choice.delta.content or "" for choice in chunk.choices]
        if "".join(pieces):
            break
    assert httpx.get(f"{base}/health").json()["running"] == 1  # the long answer is being generated
    tiny = chat(client, PROMPTS[1], temperature=1e-45)[0]
    pieces += [choice.delta.content or "" for chunk in stream for choice in chunk.choices]
    assert "".join(pieces) == expected
    assert tiny == greedy(small_checkpoint, PROMPTS[1])
    assert chat(client, PROMPTS[1], temperature=1e-6, top_p=0.5, seed=1)[0] == tiny


def test_a_failing_request_fails_alone(small_checkpoint, monkeypatch):
    """One row's failure (a prefill that runs out of memory half-way through the layers, a draw that fails) ends
    that request with a 500 only: the other rows' caches are put back and their answers stay generate's."""
    long_tokens = 160
    expected = generate_module.generate(prompt=PROMPTS[3], checkpoint_dir=small_checkpoint, temperature=0,
                                        max_new_tokens=long_tokens)[0]
    with in_process_server(small_checkpoint, max_concurrency=4) as (base, service):
        fail_prefill = threading.Event()

        def out_of_memory(block, args):  # a block's input is (rows, positions, C): more than one position = prefill
            if fail_prefill.is_set() and args[0].size(1) > 1:
                raise RuntimeError("CUDA out of memory (simulated)")

        service.engine.module.transformer.h[2].register_forward_pre_hook(out_of_memory)
        sample_row, draws = engine_module.sample_row, []

        def failing_draw(logits, job, generator):  # the third draw of the request with seed 13: in a decode step
            draws.append(job.seed)
            if draws.count(13) == 3:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0 (simulated)")
            return sample_row(logits, job, generator)

        monkeypatch.setattr(engine_module, "sample_row", failing_draw)
        with httpx.Client(base_url=base, timeout=120) as http:
            long = {"messages": [{"role": "user", "content": PROMPTS[3]}], "temperature": 0,
                    "max_tokens": long_tokens, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=long) as running:
                lines = running.iter_lines()
                first = [next(line for line in lines if '"content": "' in line and '"content": ""' not in line)]
                fail_prefill.set()
                refused = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 4})
                fail_prefill.clear()
                assert refused.status_code == 500 and "out of memory" in refused.json()["error"]["message"]
                drawn = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 8, "seed": 13})
                assert drawn.status_code == 500 and "simulated" in drawn.json()["error"]["message"]
                rest = first + [line for line in lines if line]
            events = [json.loads(line[len("data: "):]) for line in rest if line != "data: [DONE]"]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
            assert text == expected and rest[-1] == "data: [DONE]"
        assert chat(client_for(base), PROMPTS[1])[0] == greedy(small_checkpoint, PROMPTS[1])


def test_ctrl_c_stops_the_server_cleanly_mid_answer(cli_server):
    """Last in this file: Ctrl-C while an answer streams ends that answer and the process, exit code 0."""
    base, process = up(cli_server), cli_server[1]
    long = {"messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]  # the stream ends (an error event for the cut answer)
    assert rest[-1] == "data: [DONE]" and any("shutting down" in line for line in rest)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "littune serve: stopped" in err
    assert KEY not in out + err
