"""littune.serve.engine driven directly, without HTTP: rows admitted and decoded together give `generate_tokens`'s
tokens, a failing row fails alone, a cancelled row leaves the batch, a stop answers what is left with 503; adapters
on one copy of the base weights (littune.serve.models) answer as each alone and take turns."""

import queue
import time

import pytest
import torch

from conftest import make_adapter_run
from littune.prepared import encode
from littune.sampling import generate_tokens
from littune.serve import engine as engine_module
from littune.serve.engine import End, Engine, Failed, Job, Served, Text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["Give three tips for staying healthy.", "What is the capital of France?",
         "Write a haiku about the sea, please, in the style of an old sailor.", "Name a color."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def loaded(small_checkpoint):
    """(model, tokenizer) of the tiny checkpoint, on CPU in float32, as `littune generate` loads it."""
    import lightning as L

    from littune.inputs import load_for_inference

    model, tokenizer, _ = load_for_inference(L.Fabric(devices=1, accelerator="cpu", precision="32-true"),
                                             small_checkpoint)
    return model, tokenizer


def expected_tokens(model, prompt: torch.Tensor, seed=None, **sampling) -> list[int]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(generate_tokens(model, prompt, NEW_TOKENS, generator=generator, **sampling))


def new_job(prompt: torch.Tensor, events: queue.Queue, **settings) -> Job:
    return Job(prompt=prompt, max_new_tokens=settings.pop("max_new_tokens", NEW_TOKENS), emit=events.put,
               **settings)


def outcome(events: queue.Queue, timeout: float = 30) -> tuple[str, object]:
    """(the text sent, the End or Failed event that closed it)."""
    pieces, deadline = [], time.monotonic() + timeout
    while True:
        event = events.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(event, Text):
            assert event.piece
            pieces.append(event.piece)
        else:
            assert isinstance(event, (End, Failed)), event
            return "".join(pieces), event


def started(models, tokenizer, max_concurrency: int) -> Engine:
    """An engine (not yet started) over a model or Served models, recording (model name, rows) of each step."""
    if not isinstance(models, list):
        models = [Served("tiny", models.module)]
    engine = Engine(models, tokenizer, max_concurrency, context=models[0].module.config.block_size)
    steps = []
    step = engine._step
    engine._step = lambda batch: (steps.append((batch.served.name, len(batch.rows))), step(batch))[1]
    engine.steps = steps
    return engine


def rows_per_step(engine) -> list[int]:
    return [rows for _, rows in engine.steps]


def test_rows_are_admitted_and_decoded_together_as_generate_tokens_decodes_each(loaded):
    model, tokenizer = loaded
    prompts = [encode(tokenizer, text) for text in TEXTS]
    assert len({p.numel() for p in prompts}) == len(prompts)  # rows at different positions in one batch
    sampled = dict(temperature=0.9, top_k=50, top_p=0.9)
    expected = [expected_tokens(model, p) for p in prompts[:3]]
    expected.append(expected_tokens(model, prompts[3], seed=7, **sampled))
    assert expected[3] != expected_tokens(model, prompts[3])  # the seeded row really samples

    for max_concurrency in (4, 2):  # all four in one batch; two at a time, the others waiting in order
        engine = started(model, tokenizer, max_concurrency)
        queues = [queue.Queue() for _ in prompts]
        for i, (prompt, events) in enumerate(zip(prompts, queues)):
            engine.submit(new_job(prompt, events, **(dict(sampled, seed=7) if i == 3 else {})))
        engine.start()  # after the submits: the first admission takes max_concurrency of them at once
        try:
            results = [outcome(events) for events in queues]
        finally:
            engine.stop()
        for (text, end), tokens, prompt in zip(results, expected, prompts):
            assert text == tokenizer.decode(torch.tensor(tokens))
            assert end == End("length", prompt.numel(), NEW_TOKENS)
        assert max(rows_per_step(engine)) == max_concurrency and not engine.rows
        assert all(block.attn.kv_cache is None for block in engine.module.transformer.h)  # freed when idle


def test_a_failing_row_fails_alone(loaded, monkeypatch):
    """A prompt whose prefill fails (a token id outside the vocabulary) and a draw that fails end their own
    requests with 500; the rows decoded with them answer as if alone."""
    model, tokenizer = loaded
    prompts = [encode(tokenizer, text) for text in TEXTS[:2]]
    expected = [expected_tokens(model, p) for p in prompts]
    sample_row = engine_module.sample_row

    def failing_draw(logits, job, generator):  # the third draw of the request with seed 13: in a decode step
        job.draws = getattr(job, "draws", 0) + 1
        if job.seed == 13 and job.draws == 3:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0 (simulated)")
        return sample_row(logits, job, generator)

    monkeypatch.setattr(engine_module, "sample_row", failing_draw)
    engine = started(model, tokenizer, 4)
    good = [queue.Queue(), queue.Queue()]
    bad_prefill, bad_draw = queue.Queue(), queue.Queue()
    engine.submit(new_job(prompts[0], good[0]))
    engine.submit(new_job(torch.tensor([1, 2, model.config.padded_vocab_size + 5]), bad_prefill))
    engine.submit(new_job(prompts[1], bad_draw, temperature=0.8, seed=13))
    engine.submit(new_job(prompts[1], good[1]))
    engine.start()
    try:
        prefill_text, prefill_end = outcome(bad_prefill)
        draw_text, draw_end = outcome(bad_draw)
        results = [outcome(events) for events in good]
    finally:
        engine.stop()
    assert prefill_text == "" and prefill_end.status == 500 and "IndexError" in prefill_end.message
    assert draw_end.status == 500 and "simulated" in draw_end.message
    for (text, end), tokens in zip(results, expected):
        assert text == tokenizer.decode(torch.tensor(tokens)) and end.reason == "length"
    assert max(rows_per_step(engine)) == 3  # the two good rows and the sampled one were decoded together


def test_a_cancelled_row_leaves_the_batch_and_a_stop_answers_the_rest(loaded):
    model, tokenizer = loaded
    prompts = [encode(tokenizer, text) for text in TEXTS[:2]]
    expected = tokenizer.decode(torch.tensor(expected_tokens(model, prompts[1])))  # before the engine owns the model
    engine = started(model, tokenizer, 1)
    cancelled_events, after_events, running_events, waiting_events = (queue.Queue() for _ in range(4))
    cancelled = new_job(prompts[0], cancelled_events, max_new_tokens=200)
    engine.submit(cancelled)
    engine.start()
    try:
        assert isinstance(cancelled_events.get(timeout=30), Text)
        cancelled.cancelled = True  # the client has gone: dropped at the next step, no End ever sent
        engine.submit(new_job(prompts[1], after_events))  # one place: it runs once the cancelled row has left
        text, end = outcome(after_events)
        assert text == expected and end.reason == "length"
        assert all(isinstance(event, Text) for event in list(cancelled_events.queue))
        assert len(engine.steps) < 100  # the cancelled row did not run on to its 200 tokens first

        # stopping: the running row and the waiting one are told the server is shutting down
        engine.submit(new_job(prompts[0], running_events, max_new_tokens=200))
        engine.submit(new_job(prompts[1], waiting_events))
        deadline = time.monotonic() + 30
        while not engine.rows and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert not engine.thread.is_alive() and not engine.rows and not engine.pending
    for events in (running_events, waiting_events):
        assert outcome(events)[1] == Failed(503, "the server is shutting down")


def test_adapters_share_the_base_answer_as_alone_and_take_turns(small_checkpoint, loaded, tmp_path):
    """Two LoRA runs of the same flags (one module, their tensors swapped), an adapter_v2 run and the base, served
    at once on one copy of the base weights: each answer is `generate_tokens`' with that adapter loaded alone, and
    the engine steps the four batches in turn."""
    import lightning as L

    from littune.inputs import load_for_inference
    from littune.inputs import RunInputs
    from littune.serve.models import load_models

    runs = {"lora-a": make_adapter_run(small_checkpoint, tmp_path / "a", "lora", 0, lora_r=4, lora_dropout=0.0),
            "lora-b": make_adapter_run(small_checkpoint, tmp_path / "b", "lora", 1, lora_r=4, lora_dropout=0.0),
            "v2": make_adapter_run(small_checkpoint, tmp_path / "v2", "adapter_v2", 2)}
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    base_model, tokenizer = loaded
    prompts = [encode(tokenizer, text) for text in TEXTS[:2]]
    expected = {small_checkpoint.name: [expected_tokens(base_model, p) for p in prompts]}
    for name, run in runs.items():
        alone, _, _ = load_for_inference(fabric, small_checkpoint, run)
        expected[name] = [expected_tokens(alone, p) for p in prompts]
    assert len({str(tokens) for tokens in expected.values()}) == 4  # every adapter changes the answer

    models, _ = load_models(fabric, RunInputs(small_checkpoint), runs, None, None)
    assert [m.name for m in models] == [small_checkpoint.name, *runs]
    base, lora_a, lora_b, v2 = (m.served.module for m in models)
    assert lora_a is lora_b and v2 is not lora_a and base is not v2
    one_copy = base.transformer.h[0].attn.qkv.weight.data_ptr()  # the base weights, in memory once
    assert lora_a.transformer.h[0].attn.qkv.linear.weight.data_ptr() == one_copy
    assert v2.transformer.h[0].attn.qkv.linear.weight.data_ptr() == one_copy
    assert v2.lm_head.linear.weight.data_ptr() == base.lm_head.weight.data_ptr()

    engine = started([m.served for m in models], tokenizer, 8)
    queues = {m.name: [queue.Queue() for _ in prompts] for m in models}
    for m in models:
        for prompt, events in zip(prompts, queues[m.name]):
            engine.submit(new_job(prompt, events, served=m.served))
    engine.start()
    try:
        answers = {name: [outcome(events) for events in qs] for name, qs in queues.items()}
    finally:
        engine.stop()
    for name, results in answers.items():
        assert [text for text, _ in results] == [tokenizer.decode(torch.tensor(t)) for t in expected[name]], name
    # round-robin: one model's batch of two rows per step, the four in turn until all are done
    assert engine.steps == [(m.name, 2) for m in models] * (NEW_TOKENS - 1)
