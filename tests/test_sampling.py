"""`littune.sampling`: the sampling rule (greedy, temperature, top-k, top-p) against distributions computed here,
KV-cached generation against full forward passes of a tiny litgpt model, stop sequences, and the text stream."""

import random
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import copy_tokenizer
from littune.sampling import (GREEDY_BELOW, StopMatcher, batched_greedy, generate_tokens, is_greedy, sample_token,
                              stream_text)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only waits

TEXT = "naïve café 東京 🙂 done"  # 2-, 3- and 4-byte characters, split over several tokens by every family below


@pytest.fixture(scope="module")
def tokenizers():
    """litgpt Tokenizers of real vocabularies: byte-level BPE (Pythia, Falcon) and SentencePiece with byte fallback
    (Llama)."""
    from litgpt import Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        yield {family: Tokenizer(copy_tokenizer(family, Path(folder) / family))
               for family in ("pythia", "falcon", "llama")}


def tiny_gpt(kind: str, seed: int = 0):
    """A 2-layer litgpt GPT with a 96-token vocabulary, random weights: a GPT-NeoX (partial rotary, parallel
    residual, biases) or a Llama (RMSNorm, grouped-query attention, SwiGLU)."""
    from litgpt import GPT, Config

    common = dict(block_size=128, vocab_size=96, padded_vocab_size=96, n_layer=2, n_head=4, n_embd=32)
    if kind == "neox":
        config = Config(**common, rotary_percentage=0.25, parallel_residual=True, bias=True)
    else:
        config = Config(**common, n_query_groups=2, rotary_percentage=1.0, parallel_residual=False, bias=False,
                        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=64)
    torch.manual_seed(seed)
    return GPT(config).eval()


class Scripted(torch.nn.Module):
    """A stand-in for a litgpt GPT whose next token after the prompt is always the script's next one (whatever the
    sampling settings): stop sequences and streaming on known token sequences of real tokenizers."""

    def __init__(self, script: list, prompt_length: int, vocab_size: int):
        super().__init__()
        self.script, self.prompt_length, self.vocab_size = script, prompt_length, vocab_size
        self.transformer = torch.nn.ModuleDict({"ln_f": torch.nn.Identity()})  # generate_tokens hooks ln_f
        self.max_seq_length = prompt_length + len(script)

    def set_kv_cache(self, batch_size, device=None, max_seq_length=None):
        pass

    def clear_kv_cache(self):
        pass

    def forward(self, idx, input_pos, input_pos_maxp1=None):
        logits = torch.zeros(1, len(input_pos), self.vocab_size)
        for row, position in enumerate(input_pos.tolist()):
            following = position + 1 - self.prompt_length  # the script's index of the token after `position`
            if 0 <= following < len(self.script):
                logits[0, row, self.script[following]] = 10.0
        return self.transformer.ln_f(logits)


def scripted_tokens(script: list, vocab_size: int, **kwargs) -> list:
    prompt = torch.tensor([1, 2, 3])
    return list(generate_tokens(Scripted(script, len(prompt), vocab_size), prompt, **kwargs))


def draw_many(logits: torch.Tensor, n: int, seed: int = 0, **settings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.tensor([sample_token(logits, generator=generator, **settings) for _ in range(n)])


def nucleus(probs: torch.Tensor, top_p: float) -> set:
    """The smallest set of the most probable tokens whose probability reaches top_p."""
    kept, mass = set(), 0.0
    for token in probs.argsort(descending=True).tolist():
        kept.add(token)
        mass += probs[token].item()
        if mass >= top_p:
            break
    return kept


# ------------------------------------------------------------------------------------------------ sample_token


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sampling_is_float32_and_a_tiny_temperature_is_greedy(dtype):
    """Issue 24 #2: litgpt's `sample` divides the logits in their own dtype; in float16 temperature 0.001 already
    overflows to inf and the draw fails on nan probabilities, in any dtype 1e-45 does. littune's sampler computes
    in float32 and takes temperatures below GREEDY_BELOW (1e-5, as vLLM) as greedy."""
    from litgpt.generate.base import sample

    logits = (torch.randn(512, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    best = int(logits.float().argmax())
    for temperature in (1e-45, 1e-6, 0.001, GREEDY_BELOW):
        assert sample_token(logits, temperature, generator=torch.Generator().manual_seed(1)) == best
        assert sample_token(logits, temperature, top_k=5, top_p=0.5) == best
    if dtype == torch.float16:
        with pytest.raises(RuntimeError):
            sample(logits[None, None], temperature=0.001)
    with pytest.raises(RuntimeError):
        sample(logits[None, None], temperature=1e-45)
    # ordinary temperatures draw, and a generator seeded alike draws alike
    draws = {sample_token(logits, 30.0, generator=torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(draws) > 1
    assert sample_token(logits, 30.0, generator=torch.Generator().manual_seed(3)) == \
        sample_token(logits, 30.0, generator=torch.Generator().manual_seed(3))


def test_is_greedy_truth_table():
    assert is_greedy(0.0, 1.0) and is_greedy(1e-6, 0.9) and is_greedy(GREEDY_BELOW / 2, 1.0)
    assert is_greedy(1.0, 0.0) and is_greedy(0.7, -0.5)  # top_p <= 0 keeps no token but the best
    assert not is_greedy(GREEDY_BELOW, 1.0) and not is_greedy(1.0, 1.0) and not is_greedy(0.8, 1e-3)
    # greedy means the argmax, whatever top_k or the generator
    logits = torch.tensor([0.3, 2.0, 1.9, -1.0])
    assert set(draw_many(logits, 50, temperature=1.0, top_p=0.0).tolist()) == {1}
    assert set(draw_many(logits, 50, temperature=0.0, top_k=3).tolist()) == {1}


def test_frequencies_at_a_temperature_follow_the_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0])
    for temperature in (1.0, 2.5):
        counts = torch.bincount(draw_many(logits, 8_000, seed=7, temperature=temperature), minlength=4)
        torch.testing.assert_close(counts / 8_000, torch.softmax(logits / temperature, -1), atol=0.025, rtol=0)


def test_top_k_draws_only_the_k_largest_logits():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 8):
        drawn = set(draw_many(logits, 600, seed=k, temperature=3.0, top_k=k).tolist())
        assert drawn == set(logits.topk(k).indices.tolist()), k  # each of the k drawn, nothing else
    # top_k beyond the vocabulary is the whole vocabulary
    assert set(draw_many(torch.zeros(5), 200, temperature=1.0, top_k=1000).tolist()) == set(range(5))


def test_top_k_frequencies_are_the_renormalised_softmax_of_the_k():
    logits = torch.tensor([0.5, -2.0, 1.5, 0.0, 1.0, -1.0])
    counts = torch.bincount(draw_many(logits, 8_000, seed=1, temperature=1.0, top_k=3), minlength=6)
    expected = torch.zeros(6)
    expected[[2, 4, 0]] = torch.softmax(logits[[2, 4, 0]], -1)
    torch.testing.assert_close(counts / 8_000, expected, atol=0.025, rtol=0)


PROBS = torch.tensor([0.06, 0.25, 0.04, 0.4, 0.1, 0.15])  # sorted: 0.4 0.25 0.15 0.1 0.06 0.04, cumulated
# 0.4 0.65 0.8 0.9 0.96 1.0; every top_p below lies clear of those sums (no float rounding at the edge)


@pytest.mark.parametrize("top_p, temperature", [(0.3, 1.0), (0.5, 1.0), (0.7, 1.0), (0.85, 1.0), (0.93, 1.0),
                                                (0.99, 1.0), (0.7, 0.5), (0.95, 2.0)])
def test_top_p_draws_only_from_the_smallest_nucleus_reaching_p(top_p, temperature):
    """The nucleus is taken after the temperature: from softmax(logits / temperature)."""
    logits = PROBS.log()
    probs = torch.softmax(logits / temperature, -1)
    kept = nucleus(probs, top_p)
    drawn = set(draw_many(logits, 400, seed=2, temperature=temperature, top_p=top_p).tolist())
    assert drawn == kept


def test_top_p_frequencies_are_the_renormalised_nucleus():
    logits = PROBS.log()
    counts = torch.bincount(draw_many(logits, 8_000, seed=3, temperature=1.0, top_p=0.85), minlength=6)
    expected = torch.zeros(6)
    expected[[3, 1, 5, 4]] = PROBS[[3, 1, 5, 4]] / PROBS[[3, 1, 5, 4]].sum()  # 0.4 + 0.25 + 0.15 + 0.1 >= 0.85
    torch.testing.assert_close(counts / 8_000, expected, atol=0.025, rtol=0)


def test_top_k_comes_before_top_p():
    """litgpt's order: top-k first, then the nucleus of the k renormalised. The 3 best (0.4 0.25 0.15) renormalise
    to 0.5 0.3125 0.1875: p = 0.7 keeps 2 of them, where the nucleus of all 6 would keep 3."""
    logits = PROBS.log()
    assert set(draw_many(logits, 300, seed=4, temperature=1.0, top_k=3, top_p=0.7).tolist()) == {3, 1}
    assert set(draw_many(logits, 300, seed=4, temperature=1.0, top_k=3, top_p=0.9).tolist()) == {3, 1, 5}
    assert nucleus(PROBS, 0.7) == {3, 1, 5}


def test_without_a_generator_the_global_seed_decides():
    logits = torch.randn(20, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    first = [sample_token(logits, 1.5) for _ in range(30)]
    torch.manual_seed(123)
    assert [sample_token(logits, 1.5) for _ in range(30)] == first and len(set(first)) > 1


# --------------------------------------------------------------------------------------------- generate_tokens


def full_forward_logits(model, ids: list) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_kv_cached_greedy_equals_the_argmax_of_a_full_forward_at_each_step(kind):
    model = tiny_gpt(kind)
    prompt = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(1))
    cached = list(generate_tokens(model, prompt, 20, temperature=0.0))
    ids, plain = prompt.tolist(), []
    for _ in range(20):
        token = int(full_forward_logits(model, ids).argmax())
        ids.append(token)
        plain.append(token)
    assert cached == plain and len(set(plain)) > 3  # the answer is not one token repeated
    # the model is left as it was: its length, no KV cache
    assert model.max_seq_length == 128 and all(block.attn.kv_cache is None for block in model.transformer.h)


def test_kv_cached_sampling_draws_as_a_full_forward_with_the_same_generator():
    """temperature 1.3, top-k 20, a seeded generator: each token is the draw of torch.multinomial from the softmax
    of the full forward's top-20 logits / 1.3, with a generator seeded alike."""
    model = tiny_gpt("neox", seed=3)
    prompt = torch.tensor([5, 17, 42, 8])
    cached = list(generate_tokens(model, prompt, 16, temperature=1.3, top_k=20,
                                  generator=torch.Generator().manual_seed(11)))
    generator, ids, reference = torch.Generator().manual_seed(11), prompt.tolist(), []
    for _ in range(16):
        logits = full_forward_logits(model, ids)
        masked = torch.full_like(logits, float("-inf"))
        top = logits.topk(20).indices
        masked[top] = logits[top]
        token = int(torch.multinomial(torch.softmax(masked / 1.3, -1), 1, generator=generator))
        ids.append(token)
        reference.append(token)
    assert cached == reference
    greedy = list(generate_tokens(model, prompt, 16, temperature=0.0))
    assert cached != greedy


def test_generate_tokens_gives_at_most_max_new_tokens():
    model = tiny_gpt("neox")
    prompt = torch.tensor([1, 2, 3])
    long = list(generate_tokens(model, prompt, 12))
    assert len(long) == 12
    assert list(generate_tokens(model, prompt, 5)) == long[:5]
    assert list(generate_tokens(model, prompt, 1)) == long[:1]


# -------------------------------------------------------------------------------------------- stop sequences


def test_a_stop_sequence_ends_the_answer_before_it_and_false_starts_are_released():
    script = [10, 11, 7, 12, 7, 8, 13, 7, 8, 9, 14, 15]
    # 7 8 9 first completes at index 9: everything before it, the false starts 7 and 7 8 included
    assert scripted_tokens(script, 20, max_new_tokens=30, stop_tokens=([7, 8, 9],)) == script[:7]
    # several stop sequences: the first completed one ends the answer
    assert scripted_tokens(script, 20, max_new_tokens=30, stop_tokens=([14], [7, 8, 9])) == script[:7]
    assert scripted_tokens(script, 20, max_new_tokens=30, stop_tokens=([12],)) == script[:3]
    # at the token limit everything generated is output, a stop sequence begun but not completed included
    assert scripted_tokens(script, 20, max_new_tokens=9, stop_tokens=([7, 8, 9],)) == script[:9]
    assert scripted_tokens(script, 20, max_new_tokens=12, stop_tokens=([99],)) == script


def test_tokens_are_held_back_only_while_they_may_start_a_stop_sequence():
    """generate_tokens yields a token as soon as it cannot be part of a stop sequence: pulled one by one, the
    answer so far is never longer than the tokens generated minus those held back."""
    script = [10, 7, 8, 11, 12]
    model = Scripted(script, 3, 20)
    stream = generate_tokens(model, torch.tensor([1, 2, 3]), 5, stop_tokens=([7, 8, 9],))
    assert next(stream) == 10  # 10 at once
    assert next(stream) == 7 and next(stream) == 8  # released together when 11 breaks 7 8 9 ...
    assert list(stream) == [11, 12]


def test_stop_matcher_tracks_each_sequence():
    matcher = StopMatcher([[7, 8, 9], [5]])
    for token in (1, 7, 8):
        matcher.add(token)
    assert (matcher.safe, matcher.output, matcher.stopped) == (1, [1, 7, 8], False)
    matcher.add(5)
    # "7 8" were held back as a possible start of "7 8 9"; "5" ended the answer after them (litgpt's rule dropped
    # them with the stop sequence: see test_a_stop_sequence_completing_while_another_is_held_keeps_the_tokens...)
    assert matcher.stopped and matcher.output == [1, 7, 8]
    empty = StopMatcher(())
    for token in (3, 3, 4):
        empty.add(token)
    assert (empty.safe, empty.output, empty.stopped) == (3, [3, 3, 4], False)


# ------------------------------------------------------------------------------------------------ stream_text


@pytest.mark.parametrize("family", ["pythia", "falcon", "llama"])
def test_streamed_text_is_the_decode_and_never_half_a_character(tokenizers, family):
    tokenizer = tokenizers[family]
    ids = tokenizer.encode(TEXT).tolist()
    decoded_one_by_one = [tokenizer.decode(torch.tensor([i])) for i in ids]
    assert any("\ufffd" in piece for piece in decoded_one_by_one)  # some character spans tokens
    pieces = list(stream_text(tokenizer, iter(ids)))
    assert "".join(text for text, _ in pieces) == tokenizer.decode(torch.tensor(ids)) == TEXT
    emitted = ""
    for text, count in pieces:
        assert "\ufffd" not in text
        emitted += text
        assert emitted == tokenizer.decode(torch.tensor(ids[:count]))  # the text of the tokens so far
    assert [count for _, count in pieces] == sorted(count for _, count in pieces) and pieces[-1][1] == len(ids)
    assert list(stream_text(tokenizer, iter([]))) == []


@pytest.mark.parametrize("family", ["pythia", "llama"])
def test_a_stop_string_split_across_tokens_ends_the_streamed_text_before_it(tokenizers, family):
    """The answer "Sure:\\nnaïve café 東京 🙂\\n### Response: more" with the stop sequence of "\\n###" (2 or 3 tokens):
    the text stops before it, and the first "\\n", a false start of the stop sequence, is output."""
    tokenizer = tokenizers[family]
    before = "Sure:\nnaïve café 東京 🙂"
    ids = tokenizer.encode(before + "\n### Response: more").tolist()
    prefixes = [tokenizer.decode(torch.tensor(ids[:k])) for k in range(len(ids) + 1)]
    start = prefixes.index(before)
    end = prefixes.index(before + "\n###")
    stop = ids[start:end]
    assert len(stop) >= 2 and stop[0] in ids[:start]  # split across tokens; its first token occurs before
    vocab = max(ids) + 1
    answer = scripted_tokens(ids, vocab, max_new_tokens=len(ids) + 4, stop_tokens=(stop, [tokenizer.eos_id]))
    assert answer == ids[:start]
    pieces = list(stream_text(tokenizer, iter(answer)))
    assert "".join(text for text, _ in pieces) == before
    # no stop sequence: the whole text; the limit in the middle of the stop sequence: everything generated
    whole = scripted_tokens(ids, vocab, max_new_tokens=len(ids))
    assert "".join(text for text, _ in stream_text(tokenizer, iter(whole))) == prefixes[-1]
    cut = scripted_tokens(ids, vocab, max_new_tokens=end - 1, stop_tokens=(stop,))
    assert "".join(text for text, _ in stream_text(tokenizer, iter(cut))) == prefixes[end - 1]


# --------------------------------------------------------------------------------------------- batched_greedy


def test_batched_greedy_gives_each_prompt_its_own_greedy_answer_in_order():
    """Prompts of 2 to 19 tokens in batches of 3 (so batches of mixed lengths), stop sequences that end rows at
    different steps: each prompt's generate_tokens answer, in the prompts' order."""
    model = tiny_gpt("llama", seed=2)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 96, (n,), generator=generator) for n in (5, 19, 2, 11, 8, 3, 14)]
    free = [list(generate_tokens(model, p, 8)) for p in prompts]
    assert len({tuple(f) for f in free}) == len(prompts)
    stops = ([free[0][3]], free[3][5:7])  # a single token, and a two-token sequence
    alone = [list(generate_tokens(model, p, 8, stop_tokens=stops)) for p in prompts]
    assert len({len(a) for a in alone}) >= 2
    assert batched_greedy(model, prompts, 8, stops, batch_size=3) == alone
    assert batched_greedy(model, prompts, 8, batch_size=16) == free
    assert model.max_seq_length == 128 and all(block.attn.kv_cache is None for block in model.transformer.h)


def stop_run(stops, tokens) -> tuple:
    matcher = StopMatcher(stops)
    for token in tokens:
        if not matcher.stopped:
            matcher.add(token)
    return matcher.stopped, matcher.output


def test_a_stop_sequence_after_a_repeat_of_its_first_token_is_found():
    """litgpt's rule reset the progress of "5 6" to 0 on the second 5, and never matched it."""
    assert stop_run([[5, 6]], [1, 5, 5, 6, 2]) == (True, [1, 5])
    assert stop_run([[5, 5, 6]], [5, 5, 5, 6]) == (True, [5])


def test_a_stop_sequence_completing_while_another_is_held_keeps_the_tokens_before_it():
    """litgpt's rule cut the output where the longest held-back match began ("7" of "7 8 9"), not before "8 3"."""
    assert stop_run([[7, 8, 9], [8, 3]], [1, 7, 8, 3]) == (True, [1, 7])
    assert stop_run([[7, 8, 9], [8, 3]], [1, 7, 8, 9]) == (True, [1])


def test_the_stop_rule_equals_a_search_of_the_whole_output():
    """On random short token strings over a small alphabet: the output is everything before the earliest-ending
    stop sequence, or all of it; while running, nothing that could still begin a stop sequence is let out."""
    rng = random.Random(0)
    for _ in range(2000):
        stops = [[rng.randrange(4) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))]
        tokens = [rng.randrange(5) for _ in range(rng.randint(0, 12))]
        ends = [(i + len(s), i) for s in stops for i in range(len(tokens) - len(s) + 1) if tokens[i:i + len(s)] == s]
        expected = (True, tokens[:min(ends)[1]]) if ends else (False, tokens)
        assert stop_run(stops, tokens) == expected, (stops, tokens)
