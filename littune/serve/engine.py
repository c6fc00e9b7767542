"""The batching engine of `littune serve`: one thread owns the model and decodes every admitted request together.

It knows nothing of HTTP: a `Job` (prompt ids, sampling settings, an `emit` callback) goes in with `submit`, and
typed events come out through `emit`, from the engine's thread: `Text` pieces, then `End` or `Failed`.

How requests are answered: every admitted request is decoded together, one token per step for all of them
(continuous batching): a new request is prefilled alone, as `littune generate` prefills (only the last position goes
through the vocabulary projection), and joins the batch at the next step; a finished or abandoned one leaves it.
Each row keeps its own positions, so a row attends only to its own tokens, as in `littune.sampling.batched_greedy`.
Up to max_concurrency requests are in the batch; further ones wait in order. Sampling is `littune generate`'s
(`littune.sampling.sample_token`: litgpt's rule, top_k, temperature, top_p, computed in float32; a temperature
below 1e-5 is greedy, as vLLM's) with a random generator of the request's own, so a `seed` gives the same draws
whatever else the server is doing. A request that fails fails alone: a draw that fails ends its own row, a prefill
that fails (e.g. out of memory) puts the other rows' KV caches back; only a failed step of the whole batch fails
the requests in it. Greedy answers equal `littune generate`'s on CPU in float32 (tests/test_serve_engine.py,
tests/test_serve.py; scripts/bench_serve.py on SmolLM2, four at once included); on a GPU in bfloat16 a batch's other
matrix shapes round differently and can part an answer from generate's where two tokens are about equally likely.
"""

import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from littune.common import first_line
from littune.model import final_norm_keeps, unwrap
from littune.sampling import StopMatcher, is_greedy, sample_token

CACHE_GRANULARITY = 256  # the KV cache grows in steps of this many positions (fewer reallocations)


# ------------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Text:
    """A piece of the answer's text (never empty)."""

    piece: str


@dataclass(frozen=True)
class End:
    """The answer is complete: why ("stop" or "length") and the token counts of OpenAI's usage."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed: an HTTP status (500: generation failed, 503: the server is stopping) and why."""

    status: int
    message: str


Event = Union[Text, End, Failed]


# --------------------------------------------------------------------------------------------------------- jobs


@dataclass(eq=False)
class Job:
    """One request's generation: what to generate, and where to send what happens (from the engine's thread)."""

    prompt: torch.Tensor  # 1-D tensor of token ids on the model's device
    max_new_tokens: int
    emit: Callable[[Event], None]  # Text ... then End or Failed; must be safe to call from another thread
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_tokens: tuple = ()
    stop_strings: tuple = ()
    cancelled: bool = False  # set by the handler when the client has gone: the engine drops the row


@dataclass(eq=False)
class Row:
    """A job in the batch: its decoding state."""

    job: Job
    matcher: StopMatcher
    generator: Optional[torch.Generator]  # None: greedy
    position: int  # where the next token goes in the KV cache
    last: int = 0  # the last sampled token, input of the next step
    emitted: str = ""  # text sent so far


class Engine:
    """The thread that owns the model: admits waiting jobs, prefills each alone, decodes all rows together.

    The KV cache is litgpt's (one KVCache per block, batch dimension = rows), reshaped between steps: a new row's
    prefill runs on a one-row cache that is then concatenated to the batch; rows that end are dropped with an
    index_select; the cache length grows in steps of CACHE_GRANULARITY as rows get longer, and is freed when idle.
    """

    def __init__(self, model, tokenizer, max_concurrency: int, context: int):
        self.module = unwrap(model)
        self.tokenizer = tokenizer
        self.device = next(self.module.parameters()).device
        self.max_concurrency = max_concurrency
        self.context = context
        self.pending: deque[Job] = deque()  # deque's append/popleft are thread-safe
        self.wakeup = threading.Event()
        self.rows: list[Row] = []
        self.cache_length = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="littune-engine", daemon=True)

    # -- called from other threads

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self.wakeup.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.wakeup.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    # -- the engine thread

    def _run(self) -> None:
        with torch.no_grad():  # not inference_mode, as in littune.sampling: the model stays usable by autograd
            while not self.stopping:
                self.wakeup.clear()  # before looking at `pending`: a submit after this wakes the wait below
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        self._step()
                    elif not self.pending:
                        self.wakeup.wait(0.5)  # a timeout, so `stopping` set by a signal handler is seen
                except Exception as e:  # the batch's forward failed (e.g. out of memory): its requests, keep serving
                    self._fail_all(e)
        for leftover in [row.job for row in self.rows] + list(self.pending):
            emit(leftover, Failed(503, "the server is shutting down"))
        self.pending.clear()
        self._reset()

    def _admit(self) -> None:
        """Prefill waiting jobs while the batch has room; a prompt that fails (e.g. out of memory) fails alone."""
        while len(self.rows) < self.max_concurrency and self.pending and not self.stopping:
            job = self.pending.popleft()
            if not job.cancelled:
                try:
                    self._prefill(job)
                except Exception as e:
                    fail(job, e)

    def _prefill(self, job: Job) -> None:
        """The prompt alone through the model, on a fresh one-row cache (as `littune generate` prefills), then that
        cache joins the batch's. If anything fails, the other rows' caches are put back and only this job fails."""
        blocks = self.module.transformer.h
        saved = [block.attn.kv_cache for block in blocks] if self.rows else None
        n = job.prompt.numel()
        try:
            length = max(self.cache_length, round_up(n + 1, self.context))
            if saved is not None and length > self.cache_length:
                self._grow(length, saved)
            self.module.set_kv_cache(batch_size=1, max_seq_length=length, device=self.device)
            with final_norm_keeps(self.module, lambda out: out[:, -1:]):
                logits = self.module(job.prompt[None], torch.arange(n, device=self.device), input_pos_maxp1=n)
            if saved is not None:
                for block, old in zip(blocks, saved):
                    new = block.attn.kv_cache
                    new.k, new.v = torch.cat([old.k, new.k]), torch.cat([old.v, new.v])
        except Exception:
            self._restore(saved)
            raise
        self.cache_length = length
        self.rows.append(Row(job=job, matcher=StopMatcher(job.stop_tokens), generator=new_generator(job, self.device),
                             position=n))
        self._take_all(logits[:, -1], [len(self.rows) - 1])

    def _restore(self, saved: Optional[list]) -> None:
        """After a failed prefill: the batch's own caches back in every block, at the batch's cache length (a grow
        that failed half-way is cut back: views, no new memory), the causal mask as long. Without a batch (saved is
        None), nothing to keep. If even this fails, every request in the batch fails."""
        if saved is None:
            self._reset()
            return
        try:
            from litgpt.model import build_mask_cache

            for block, cache in zip(self.module.transformer.h, saved):
                cache.k, cache.v = cache.k[:, :, :self.cache_length], cache.v[:, :, :self.cache_length]
                cache.max_cache_len = self.cache_length
                block.attn.kv_cache = cache
            mask = self.module.mask_cache
            if mask is None or mask.size(3) != self.cache_length:
                self.module.mask_cache = build_mask_cache(self.cache_length, self.device)
        except Exception as e:
            self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        """The batch is lost (its forward failed): every row's request gets the error, the cache is freed."""
        failed = [row.job for row in self.rows]
        self._reset()
        for job in failed:
            fail(job, error)

    def _step(self) -> None:
        """One new token for every row."""
        need = max(row.position for row in self.rows) + 1
        if need > self.cache_length:
            self._grow(round_up(need, self.context))
        tokens = torch.tensor([[row.last] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        logits = self.module(tokens, positions, input_pos_maxp1=need)
        for row in self.rows:
            row.position += 1
        self._take_all(logits[:, -1], range(len(self.rows)))

    def _take_all(self, logits: torch.Tensor, indices) -> None:
        """Sample the next token of these rows (logits: one row of logits each, in the order of `indices`) and send
        their text; rows that are done leave the batch. A row whose sampling or text fails (e.g. non-finite
        probabilities) fails alone: the other rows go on."""
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        finished = set()
        for k, i in enumerate(indices):
            row = self.rows[i]
            try:
                token = greedy[k] if row.generator is None else sample_row(logits[k], row.job, row.generator)
                done = take_token(self.tokenizer, row, token)
            except Exception as e:
                fail(row.job, e)
                done = True
            if done:
                finished.add(i)
        if finished:
            self._keep([i for i in range(len(self.rows)) if i not in finished])

    def _drop_cancelled(self) -> None:
        if any(row.job.cancelled for row in self.rows):
            self._keep([i for i, row in enumerate(self.rows) if not row.job.cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Only these rows stay in the batch (and in the KV cache)."""
        if not keep:
            self._reset()
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.device)
            for block in self.module.transformer.h:
                cache = block.attn.kv_cache
                cache.k, cache.v = cache.k.index_select(0, index), cache.v.index_select(0, index)
            self.rows = [self.rows[i] for i in keep]

    def _grow(self, length: int, caches: Optional[list] = None) -> None:
        """Lengthen every row's KV cache (and the causal mask) to `length` positions; the new ones are empty."""
        from litgpt.model import build_mask_cache

        for cache in caches if caches is not None else [block.attn.kv_cache for block in self.module.transformer.h]:
            extra = length - cache.k.size(2)
            cache.k = torch.nn.functional.pad(cache.k, (0, 0, 0, extra))
            cache.v = torch.nn.functional.pad(cache.v, (0, 0, 0, extra))
            cache.max_cache_len = length
        self.module.mask_cache = build_mask_cache(length, self.device)
        self.cache_length = length

    def _reset(self) -> None:
        self.rows = []
        self.cache_length = 0
        self.module.clear_kv_cache()  # frees the cache while idle


# ------------------------------------------------------------------------------------------------------ helpers


def round_up(n: int, limit: int) -> int:
    return min(limit, -(-n // CACHE_GRANULARITY) * CACHE_GRANULARITY)


def emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the event loop is gone (server stopping): nobody is listening any more
        job.cancelled = True


def fail(job: Job, error: Exception) -> None:
    traceback.print_exception(error, file=sys.stderr)
    emit(job, Failed(500, f"generation failed: {type(error).__name__}: {first_line(error)}"))


def new_generator(job: Job, device) -> Optional[torch.Generator]:
    """The request's own random generator (seeded where it gives a seed); None where it is greedy."""
    if is_greedy(job.temperature, job.top_p):
        return None
    generator = torch.Generator(device=device)
    if job.seed is None:
        generator.seed()
    else:
        generator.manual_seed(job.seed)
    return generator


def sample_row(logits: torch.Tensor, job: Job, generator: torch.Generator) -> int:
    """The request's next token: `littune.sampling.sample_token`, as `littune generate` draws (in float32, greedy
    below a tiny temperature), from the request's own generator: the same draws `littune generate --seed` makes for
    this request alone on CPU (its global generator, seeded the same, gives the same stream)."""
    return sample_token(logits, job.temperature, job.top_k, job.top_p, generator)


def take_token(tokenizer, row: Row, token: int) -> bool:
    """Add a sampled token to a row and send the text it completes; True when the row is done."""
    job, matcher = row.job, row.matcher
    row.last = token
    matcher.add(token)
    # litgpt generate_fn's rule: tokens that may start a stop sequence are held back, at the limit all are output
    reason = "stop" if matcher.stopped else ("length" if len(matcher.tokens) >= job.max_new_tokens else None)
    ids = matcher.output if reason else matcher.tokens[:matcher.safe]
    piece, row.emitted, hit = advance_text(tokenizer, ids, row.emitted, job.stop_strings, reason is not None)
    if piece:
        emit(job, Text(piece))
    if hit:
        reason = "stop"
    if reason:
        emit(job, End(reason, job.prompt.numel(), len(matcher.tokens)))
        return True
    return False


def advance_text(tokenizer, ids: list[int], emitted: str, stop_strings: tuple, final: bool) -> tuple[str, str, bool]:
    """(new text to send, all text sent, a stop string was hit) after the answer's tokens became `ids`.

    The whole answer is decoded each time (per-token decoding loses SentencePiece's spaces and splits multi-byte
    characters), as littune.sampling.stream_text does. A stop string ends the text before its first match; text
    that may be the start of a stop string is held back until it is known not to be one. Text already sent is known
    not to begin a stop string, so only the text after it is searched: at most the held-back text (shorter than the
    longest stop string) and this token's new text.
    """
    text = tokenizer.decode(torch.tensor(ids, dtype=torch.long)) if ids else ""
    if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
        return "", emitted, False
    hit = False
    if stop_strings:
        cuts = [i for s in stop_strings if (i := text.find(s, len(emitted))) >= 0]
        if cuts:
            text, hit = text[:min(cuts)], True
        elif not final:
            text = text[:len(text) - possible_stop_start(text, stop_strings, len(emitted))]
    if not text.startswith(emitted):  # the decoder changed text already sent (rare): send nothing more now
        return "", emitted, hit
    return text[len(emitted):], text, hit


def possible_stop_start(text: str, stop_strings: tuple, start: int = 0) -> int:
    """Length of the longest end of `text`, from `start` on, that is the beginning of a stop string: only the last
    len(s) - 1 characters, and only where s's first character is, are tried."""
    longest = 0
    for s in stop_strings:
        i = max(start, len(text) - len(s) + 1, 0)
        while (i := text.find(s[0], i)) >= 0 and len(text) - i > longest:
            if s.startswith(text[i:]):
                longest = len(text) - i
                break
            i += 1
    return longest
