"""Sampling, shared by generate, evaluate, serve and the training loop's sample answers.

- `generate_tokens`: one prompt, KV-cached, token by token, with litgpt `generate_fn`'s rules (stop sequences held
  back until they are known not to be one); `stream_text` turns those tokens into text pieces as they arrive.
- `sample_token`: the next token of one row of logits, litgpt's `sample` rule (top-k, temperature, top-p) computed
  in float32, greedy below GREEDY_BELOW; `littune generate` and `littune serve` both draw with it, so a seeded
  request to serve gives generate's answer.
- `batched_greedy`: many prompts, greedy, batched with a KV cache, giving the tokens `generate_tokens` gives each
  prompt alone.

Why `batched_greedy` gives the tokens of `littune generate --temperature 0`, one prompt at a time: each batch is right-padded and every row keeps its own
positions (0 .. prompt length - 1 in the prefill, then its own next position while decoding, passed to litgpt as
a batched `input_pos` of shape (B, 1)). So each row gets the rotary angles, KV-cache slots and causal mask rows it
gets alone; litgpt's own causal mask hides the pad slots beyond a row's position, and those slots are overwritten
by the row's own tokens before its position reaches them. (Left padding with shared positions would give every row
the same relative positions, but rotary angles of other absolute positions round differently in float32, enough to
flip a near-tie.) What remains differs in the last bits only: a matrix product over a batch runs other CPU/GPU
kernels than over a single row (float32 logits differ by about 1e-6), so batched and one-by-one could only part
where the two best tokens are closer than that; the tests check every record on several architectures.
"""

import sys
from typing import Iterator, Optional, Sequence

import torch

from littune.common import UserError
from littune.model import final_norm_keeps, sequence_length, unwrap


# Temperatures below this are greedy, as vLLM's (its _SAMPLING_EPS): the logits divided by 1e-45 overflow to inf
# even in float32 and the softmax turns to nan; in float16 0.001 already overflows, hence also float32 sampling.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float, top_p: float) -> bool:
    return temperature < GREEDY_BELOW or top_p <= 0


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> int:
    """The next token from one row of logits (shape: vocabulary): litgpt's `sample` (top-k, then temperature, then
    top-p, then one draw; argmax where greedy) in float32 whatever the model's dtype, drawing from `generator`
    (None: torch's global one, which `littune generate --seed` seeds)."""
    from litgpt.generate.base import sample_top_p

    logits = logits.float()
    if is_greedy(temperature, top_p):
        return int(logits.argmax())
    if top_k is not None:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    logits = logits / temperature
    if top_p < 1.0:
        logits = sample_top_p(logits, top_p)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


@torch.no_grad()  # not inference_mode: the RoPE table rebuilt on leaving must stay usable by autograd
def generate_tokens(
    model, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
    top_p: float = 1.0, stop_tokens: tuple = (), generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """New token ids, one at a time, KV-cached; stops before a stop sequence (tokens that may start one are held
    back, as litgpt's `generate_fn` does). The prompt's prefill projects only its last position onto the
    vocabulary, as `batched_greedy` and serve do."""
    n, device = prompt_ids.numel(), prompt_ids.device
    matcher = StopMatcher(stop_tokens)
    sent = 0
    # a KV cache (and RoPE table) exactly as long as this answer can get, no longer
    with sequence_length(model, n + max_new_tokens) as module:
        module.set_kv_cache(batch_size=1, device=device)
        with final_norm_keeps(module, lambda out: out[:, -1:]):
            logits = module(prompt_ids[None], torch.arange(n, device=device), input_pos_maxp1=n)
        for step in range(max_new_tokens):
            token = sample_token(logits[0, -1], temperature, top_k, top_p, generator)
            matcher.add(token)
            if matcher.stopped:
                return
            yield from matcher.tokens[sent:matcher.safe]
            sent = matcher.safe
            if step < max_new_tokens - 1:
                logits = module(torch.tensor([[token]], device=device), torch.tensor([n + step], device=device),
                                input_pos_maxp1=n + step + 1)
    yield from matcher.tokens[sent:]  # at the limit everything generated is output


def stream_text(tokenizer, tokens: Iterator[int]) -> Iterator[tuple[str, int]]:
    """(new text, tokens so far) as tokens arrive. Decodes the whole answer each time and emits the difference:
    per-token decoding drops the spaces of SentencePiece and splits multi-byte characters of byte-level BPE."""
    ids, emitted = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(torch.tensor(ids))
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        if text.startswith(emitted):
            yield text[len(emitted):], len(ids)
            emitted = text
    text = tokenizer.decode(torch.tensor(ids)) if ids else ""
    if text != emitted and text.startswith(emitted):
        yield text[len(emitted):], len(ids)
    elif ids:
        yield "", len(ids)


class StopMatcher:
    """The stop-sequence rule for one row (as litgpt `generate_fn`'s, without its two misses: a stop sequence right
    after a repeat of its first token, and the tokens before a stop sequence that completes while another is held).

    The output ends before the first completed stop sequence; the tokens that may be the start of one (the longest
    end of the tokens that begins a stop sequence) are held back until they are not. At the token limit everything
    generated is output.
    """

    def __init__(self, stop_tokens: Sequence[Sequence[int]]):
        self.stop_tokens = [list(seq) for seq in stop_tokens if len(seq)]
        self.tokens: list[int] = []
        self.safe = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.tokens.append(token)
        n = len(self.tokens)
        ending = [len(seq) for seq in self.stop_tokens if self.tokens[n - len(seq):] == seq]
        if ending:  # where several end here, the longest: its first tokens were held back as its start
            self.stopped, self.safe = True, n - max(ending)
            return
        held = max((k for seq in self.stop_tokens for k in range(1, min(len(seq), n + 1))
                    if self.tokens[n - k:] == seq[:k]), default=0)
        self.safe = n - held

    @property
    def output(self) -> list[int]:
        return self.tokens[:self.safe] if self.stopped else self.tokens


@torch.no_grad()  # not inference_mode: the RoPE table rebuilt on leaving must stay usable by autograd
def batched_greedy(
    model, prompts: list[torch.Tensor], max_new_tokens: int, stop_tokens: Sequence[Sequence[int]] = (),
    batch_size: int = 16, device=None, progress: bool = False,
) -> list[list[int]]:
    """Greedy new tokens for every prompt, in the prompts' order: the tokens `generate_tokens(model, prompt,
    max_new_tokens, temperature=0, stop_tokens=...)` gives for each prompt alone, computed batch by batch.

    Prompts are sorted by length so a batch holds prompts of similar lengths (little padding). See the module
    docstring for why per-row positions make this equal to one-by-one generation.
    """
    from tqdm import tqdm

    device = device or next(unwrap(model).parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    # the rope cache covers the longest row; each batch gets a KV cache of its own width
    with sequence_length(model, max(len(p) for p in prompts) + max_new_tokens) as module, \
            tqdm(total=len(prompts), desc="Generating", unit="rec", file=sys.stderr, dynamic_ncols=True,
                 disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, tokens in zip(batch, _greedy_batch(module, [prompts[i] for i in batch], max_new_tokens,
                                                      stop_tokens, device)):
                results[i] = tokens
            bar.update(len(batch))
    return results


def _greedy_batch(module, prompts: list[torch.Tensor], max_new_tokens: int, stop_tokens, device) -> list[list[int]]:
    rows = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    idx = torch.zeros((rows, width), dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, :len(prompt)] = prompt.to(device)
    module.set_kv_cache(batch_size=rows, max_seq_length=width + max_new_tokens, device=device)
    matchers = [StopMatcher(stop_tokens) for _ in prompts]

    # Prefill: every row at positions 0..width-1 (pads after a row's prompt are never attended by its real tokens);
    # only each row's last prompt position goes through the vocabulary projection
    every_row, last = torch.arange(rows, device=device), lengths - 1
    with final_norm_keeps(module, lambda out: out[every_row, last][:, None]):
        logits = module(idx, torch.arange(width, device=device), input_pos_maxp1=width)
    positions = lengths.clone()
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(dim=-1)
        for matcher, token in zip(matchers, tokens.tolist()):
            if not matcher.stopped:
                matcher.add(token)
        if step == max_new_tokens - 1 or all(m.stopped for m in matchers):
            break
        # a stopped row keeps decoding (its tokens are ignored) so the batch stays rectangular
        logits = module(tokens[:, None], positions[:, None], input_pos_maxp1=int(positions.max()) + 1)
        positions += 1
    return [m.output for m in matchers]


def check_fits(prompt_ids: torch.Tensor, max_new_tokens: int, block_size: int) -> None:
    if prompt_ids.numel() + max_new_tokens > block_size:
        raise UserError(
            f"the prompt ({prompt_ids.numel()} tokens) plus --max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {block_size} tokens; shorten the prompt or lower --max_new_tokens"
        )
