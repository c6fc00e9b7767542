"""`littune.scoring`: label log-probabilities equal a plain forward and transformers, batched == one by one, the label
ids rule (EOS, prefix labels, BPE merges at the seam), ties, and the test loss taken from the same pass.

Tiny random models of two architectures (GPT-NeoX with the Pythia tokenizer; Llama with grouped-query attention and
SentencePiece), real SST-2 sentences prepared by the real CLI.
"""

import json

import pytest
import torch

from conftest import SST2_TRAIN, make_hf_checkpoint
from littune import scoring
from littune.cli import main

COLUMNS = json.dumps({"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                      "output": "label"})
VALUES = json.dumps({"1": "positive", "0": "negative"})
# one-token labels, a several-token label, and a label that is a prefix of another ("pos" / "positive")
TEXTS = ["positive", "negative", "pos", "rather negative, I think"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def tiny(request, tmp_path_factory):
    """(checkpoint folder, transformers model, prepared data folder: 24 test records, masked and not)."""
    folder = tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}"
    hf_model = make_hf_checkpoint(folder, request.param, seed=1, initializer_range=0.2)  # answers vary by prompt
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    data = tmp_path_factory.mktemp("data")
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:61]
    (data / "sst2.tsv").write_text("".join(lines), encoding="utf-8")
    for mask in ("true", "false"):
        assert main(["prepare", "--data_file", str(data / "sst2.tsv"), "--checkpoint_dir", str(folder),
                     "--destination_path", str(data / f"mask-{mask}"), "--test_size", "24", "--mask_inputs", mask,
                     "--columns", COLUMNS, "--output_values", VALUES]) == 0
    return folder, hf_model, data


def load(checkpoint, precision="32-true"):
    import lightning as L

    from littune.inputs import load_for_inference

    model, tokenizer, _ = load_for_inference(L.Fabric(devices=1, accelerator="cpu", precision=precision), checkpoint)
    return model, tokenizer


def records_of(data, mask="true"):
    from littune.prepared import load_split

    return load_split(data / f"mask-{mask}", "test")


def alpaca():
    from litgpt.prompts import Alpaca

    return Alpaca()


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1.., from one forward without a KV cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids[:-1]])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------- log-probabilities


def test_logprobs_equal_a_plain_forward_and_transformers(tiny):
    """Every label token's log-probability (shared prefix, batched contexts, continuation rows with copied caches)
    and context targets inside and after the shared prefix, against a plain forward over context + label and against
    transformers on the Hugging Face checkpoint the model was converted from."""
    checkpoint, hf_model, data = tiny
    model, tokenizer = load(checkpoint)
    records = records_of(data)[:11]
    requests = scoring.label_requests(tokenizer, alpaca(), records, TEXTS, model.config.block_size)
    for i, request in enumerate(requests):
        if i % 2:  # positions 1 and 3 lie in the shared prefix, the last two after it
            n = len(request["context"])
            request["targets"] = [1, 3, n - 2, n - 1]
    results = scoring.token_logprobs(model, requests, batch_size=4)
    assert scoring.common_prefix_length([r["context"] for r in requests]) > 10  # the Alpaca preamble is shared

    for request, result in zip(requests, results):
        context = request["context"]
        full = plain_logprobs(model, context + request["continuations"][0])
        assert result["context"] == pytest.approx([float(full[t - 1]) for t in request.get("targets", [])], abs=1e-4)
        for ids, got in zip(request["continuations"], result["continuations"]):
            sequence = context + ids
            assert len(got) == len(ids)
            n = len(context)
            assert got == pytest.approx(plain_logprobs(model, sequence)[n - 1:].tolist(), abs=1e-4)
            assert got == pytest.approx(hf_logprobs(hf_model, sequence)[n - 1:].tolist(), abs=1e-4)


def test_batched_equals_one_by_one(tiny):
    checkpoint, _, data = tiny
    model, tokenizer = load(checkpoint)
    records = records_of(data, "false")
    requests = scoring.label_requests(tokenizer, alpaca(), records, TEXTS, model.config.block_size)
    requests, _ = scoring.with_loss(requests, records, -100)  # and the loss's context targets
    batched = scoring.token_logprobs(model, requests, batch_size=5)
    alone = [scoring.token_logprobs(model, [r], batch_size=1)[0] for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert b["context"] == pytest.approx(a["context"], abs=1e-5)
        for x, y in zip(b["continuations"], a["continuations"], strict=True):
            assert x == pytest.approx(y, abs=1e-5)
    predictions = [[scoring.predict([sum(c) for c in r["continuations"][:len(TEXTS)]])] for r in batched]
    assert predictions == [[scoring.predict([sum(c) for c in r["continuations"][:len(TEXTS)]])] for r in alone]


def test_a_shared_prefix_runs_once(tiny, monkeypatch):
    checkpoint, _, data = tiny
    model, tokenizer = load(checkpoint)
    records = records_of(data)
    requests = scoring.label_requests(tokenizer, alpaca(), records, TEXTS[:2], model.config.block_size)
    calls = []
    original = scoring._prefix
    monkeypatch.setattr(scoring, "_prefix", lambda *a: calls.append(len(a[2])) or original(*a))
    scoring.token_logprobs(model, requests, batch_size=4)  # 6 batches
    assert len(calls) == 1 and calls[0] > 10


def test_bf16_on_cpu_is_close_to_float32(tiny):
    checkpoint, _, data = tiny
    records = records_of(data)[:8]
    sums = {}
    for precision in ("32-true", "bf16-true"):
        model, tokenizer = load(checkpoint, precision)
        assert next(model.parameters()).dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
        requests = scoring.label_requests(tokenizer, alpaca(), records, TEXTS, model.config.block_size)
        sums[precision] = [[sum(c) for c in r["continuations"]] for r in scoring.token_logprobs(model, requests, 4)]
    for a, b in zip(sums["32-true"], sums["bf16-true"]):
        assert b == pytest.approx(a, abs=0.3)  # bf16 logits: ~3 significant digits per token


# --------------------------------------------------------------------------------------------- the label ids rule


def test_label_ids_are_the_prompt_plus_label_tokens_after_the_prompt_then_eos(tiny):
    checkpoint, _, data = tiny
    model, tokenizer = load(checkpoint)
    records = records_of(data)
    requests = scoring.label_requests(tokenizer, alpaca(), records, TEXTS, model.config.block_size)
    for record, request in zip(records, requests):
        assert request["prompt"] == alpaca().apply(record["instruction"], input=record["input"])
        assert request["context"] == record["input_ids_no_response"].tolist()
        for text, ids in zip(TEXTS, request["continuations"]):
            assert request["context"] + ids == tokenizer.encode(request["prompt"] + text).tolist() + [tokenizer.eos_id]
            assert ids[-1] == tokenizer.eos_id and len(ids) >= 2
        # the record's own training sequence is context + its label's ids
        label_ids = request["continuations"][TEXTS.index(record["output"])]
        assert request["context"] + label_ids == record["input_ids"].tolist()
    # "pos" is a prefix of "positive" in text; its ids end with EOS where "positive"'s go on (or differ)
    pos, positive = (requests[0]["continuations"][TEXTS.index(t)] for t in ("pos", "positive"))
    assert pos != positive and pos[-1] == tokenizer.eos_id
    assert len(requests[0]["continuations"][3]) > 3  # several tokens


def test_a_bpe_merge_at_the_seam_moves_the_split_back(tmp_path):
    """A prompt ending in a space: the Pythia BPE merges it into the label (" positive"). Cut at len(prompt ids), the
    label would be only EOS (every label tied); the context is cut back instead."""
    from litgpt.prompts import PromptStyle

    from conftest import copy_tokenizer
    from littune.prepared import load_tokenizer

    class Spaced(PromptStyle):
        def apply(self, prompt, **kwargs):
            return f"{kwargs['input']}\nSentiment: "

    tokenizer = load_tokenizer(copy_tokenizer("pythia", tmp_path / "tok"))
    record = {"instruction": "", "input": "a charming movie", "output": "positive"}
    prompt_ids = tokenizer.encode("a charming movie\nSentiment: ").tolist()
    (request,) = scoring.label_requests(tokenizer, Spaced(), [record], ["positive", "negative"], 256)
    assert len(request["context"]) == len(prompt_ids) - 1 and request["context"] == prompt_ids[:-1]
    for text, ids in zip(["positive", "negative"], request["continuations"]):
        assert tokenizer.decode(torch.tensor(ids[:-1])) == f" {text}" and ids[-1] == tokenizer.eos_id
        assert request["context"] + ids == tokenizer.encode(request["prompt"] + text).tolist() + [tokenizer.eos_id]
        assert tokenizer.encode(request["prompt"] + text).tolist()[len(prompt_ids):] == []  # the literal cut: nothing


def test_label_texts_are_the_spelling_of_the_data():
    expected = ["Positive", "Positive", "positive", " negative", "Positive"]
    assert scoring.label_texts(expected, ["negative", "positive", "neutral"]) == [" negative", "Positive", "neutral"]


def test_ties_go_to_the_first_label_and_norm_divides_by_bytes(tiny):
    assert scoring.predict([-2.0, -1.0, -1.0]) == 1
    assert scoring.predict([-3.0, -2.0], sizes=[3, 1]) == 0  # -1 per byte beats -2
    checkpoint, _, data = tiny
    model, tokenizer = load(checkpoint)
    records = records_of(data)[:6]
    # two labels scored with the same text: equal log-probabilities, so the first label of the order wins
    for labels in (["negative", "positive"], ["positive", "negative"]):
        rows = scoring.score_labels(model, tokenizer, alpaca(), records, labels, texts=["positive", "positive"])
        for row in rows:
            assert row["choices"][labels[0]]["logprob"] == row["choices"][labels[1]]["logprob"]
            assert row["predicted"] == row["predicted_norm"] == labels[0]
    rows = scoring.score_labels(model, tokenizer, alpaca(), records, ["negative", "positive"])
    for row in rows:
        logprobs = {label: choice["logprob"] for label, choice in row["choices"].items()}
        assert row["predicted"] == max(logprobs, key=logprobs.get)
        assert row["predicted_norm"] == max(logprobs, key=lambda label: logprobs[label] / len(label))


# ---------------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("mask", ["true", "false"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_loss_from_the_scoring_pass_equals_teacher_forcing(tiny, mask, with_labels):
    """The test loss taken from the label pass (the response as one more continuation, prompt targets as context
    targets) equals cross-entropy over a plain forward of every record; one record whose context is not a prefix of
    its input_ids takes the separate-request path."""
    from littune.model import count_targets

    checkpoint, _, data = tiny
    model, tokenizer = load(checkpoint)
    records = records_of(data, mask)
    if with_labels:
        requests = scoring.label_requests(tokenizer, alpaca(), records, TEXTS, model.config.block_size)
    else:
        requests = [{"context": r["input_ids_no_response"].tolist(), "continuations": []} for r in records]
    requests[2] = dict(requests[2], context=requests[2]["context"][:-1] + [7])  # not what the record starts with
    scored, plans = scoring.with_loss(requests, records, -100)
    assert len(scored) == len(records) + 1
    results = scoring.token_logprobs(model, scored, batch_size=5)
    total, count = scoring.loss_terms(scored, results, plans)

    expected_total = 0.0
    for r in records:
        logprobs = plain_logprobs(model, r["input_ids"].tolist())
        expected_total -= float(logprobs[r["labels"][1:] != -100].sum())
    assert count == count_targets(records, range(len(records)), -100)
    assert total == pytest.approx(expected_total, rel=1e-5)
    if with_labels:  # the response is one of the label continuations: no extra row
        assert all(len(s["continuations"]) == len(TEXTS) for s in scored[:len(records)])


def test_length_batches_cover_every_record_once_within_limits():
    lengths = [5, 300, 17, 17, 64, 1, 2000, 40] * 3
    batches = scoring.length_batches(lengths, batch_size=4, max_tokens=600)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 600
