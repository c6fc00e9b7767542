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
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from littune.common import first_line
from littune.model import final_norm_keeps
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


def nothing(module) -> None:
    pass


@dataclass(eq=False)
class Served:
    """A model the engine runs rows through: a module, and the adapter tensors it must hold for them. Several may
    share one module (adapters of one method and flags): before a model's rows run, its tensors are swapped into the
    module's parameters (pointers, no copy) and `before_forward` drops what the module cached from the others."""

    name: str
    module: torch.nn.Module
    tensors: dict = field(default_factory=dict)  # parameter name -> this model's tensor; empty: nothing to swap
    before_forward: Callable[[torch.nn.Module], None] = nothing  # a method's (adapter_v2: its cached prefix K/V)


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
    served: Optional[Served] = None  # which model answers (None: the engine's first)
    cancelled: bool = False  # set by the handler when the client has gone: the engine drops the row


@dataclass(eq=False)
class Row:
    """A job in a batch: its decoding state."""

    job: Job
    matcher: StopMatcher
    generator: Optional[torch.Generator]  # None: greedy
    position: int  # where the next token goes in the KV cache
    last: int = 0  # the last sampled token, input of the next step
    emitted: str = ""  # text sent so far


@dataclass(eq=False)
class Batch:
    """The rows of one served model, decoded together, and their KV caches: litgpt's KVCache of each block (batch
    dimension = rows, `length` positions) and the causal mask as long; installed in the module before it runs."""

    served: Served
    rows: list = field(default_factory=list)
    caches: Optional[list] = None
    mask: Optional[torch.Tensor] = None
    length: int = 0


class Engine:
    """The thread that owns the models: admits waiting jobs, prefills each alone, decodes each model's rows together,
    one model's batch per step in turn (round-robin: requests for one adapter never starve another's).

    A batch's KV caches are reshaped between steps: a new row's prefill runs on a one-row cache that is then
    concatenated to the batch's; rows that end are dropped with an index_select; the cache length grows in steps of
    CACHE_GRANULARITY as rows get longer, and is freed when the batch is empty.
    """

    def __init__(self, models: list[Served], tokenizer, max_concurrency: int, context: int):
        self.batches = [Batch(served) for served in models]
        self.module = models[0].module  # the first model's (the only one without --adapter)
        self.tokenizer = tokenizer
        self.device = next(self.module.parameters()).device
        self.max_concurrency = max_concurrency
        self.context = context
        self.pending: deque[Job] = deque()  # deque's append/popleft are thread-safe
        self.wakeup = threading.Event()
        self.holding: dict[int, Served] = {}  # id(module) -> the model whose tensors it holds
        self.swaps = {id(m): [(m.module.get_parameter(name), t) for name, t in m.tensors.items()] for m in models}
        self.turn = -1  # index of the batch stepped last
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

    @property
    def rows(self) -> list[Row]:
        """Every row being decoded, of every model."""
        return [row for batch in self.batches for row in batch.rows]

    # -- the engine thread

    def _run(self) -> None:
        with torch.no_grad():  # not inference_mode, as in littune.sampling: the model stays usable by autograd
            while not self.stopping:
                self.wakeup.clear()  # before looking at `pending`: a submit after this wakes the wait below
                for batch in self.batches:
                    self._guarded(batch, self._drop_cancelled)
                self._admit()
                batch = self._next_batch()
                if batch is not None:
                    self._guarded(batch, self._step)
                elif not self.pending:
                    self.wakeup.wait(0.5)  # a timeout, so `stopping` set by a signal handler is seen
        for leftover in [row.job for row in self.rows] + list(self.pending):
            emit(leftover, Failed(503, "the server is shutting down"))
        self.pending.clear()
        for batch in self.batches:
            self._reset(batch)

    def _guarded(self, batch: Batch, work: Callable[[Batch], None]) -> None:
        """The batch's forward failed (e.g. out of memory): its requests fail, the other batches go on."""
        try:
            work(batch)
        except Exception as e:
            self._fail_all(batch, e)

    def _next_batch(self) -> Optional[Batch]:
        """The next batch with rows after the one stepped last."""
        for k in range(1, len(self.batches) + 1):
            index = (self.turn + k) % len(self.batches)
            if self.batches[index].rows:
                self.turn = index
                return self.batches[index]
        return None

    def _admit(self) -> None:
        """Prefill waiting jobs while there is room; a prompt that fails (e.g. out of memory) fails alone."""
        while len(self.rows) < self.max_concurrency and self.pending and not self.stopping:
            job = self.pending.popleft()
            if not job.cancelled:
                batch = next((b for b in self.batches if b.served is job.served), self.batches[0])
                try:
                    self._prefill(batch, job)
                except Exception as e:
                    fail(job, e)

    def _use(self, batch: Batch) -> torch.nn.Module:
        """The batch's module, holding the batch's model's tensors, KV caches and mask."""
        served, module = batch.served, batch.served.module
        if served.tensors and self.holding.get(id(module)) is not served:
            for parameter, tensor in self.swaps[id(served)]:
                parameter.data = tensor
            served.before_forward(module)
            self.holding[id(module)] = served
        for block, cache in zip(module.transformer.h, batch.caches or [None] * len(module.transformer.h)):
            block.attn.kv_cache = cache
        module.mask_cache = batch.mask
        return module

    def _prefill(self, batch: Batch, job: Job) -> None:
        """The prompt alone through the model, on a fresh one-row cache (as `littune generate` prefills), then that
        cache joins the batch's. If anything fails, the batch's caches are put back and only this job fails."""
        module = self._use(batch)
        saved = batch.caches if batch.rows else None
        n = job.prompt.numel()
        try:
            length = max(batch.length, round_up(n + 1, self.context))
            if saved is not None and length > batch.length:
                grow(saved, length)
            module.set_kv_cache(batch_size=1, max_seq_length=length, device=self.device)
            with final_norm_keeps(module, lambda out: out[:, -1:]):
                logits = module(job.prompt[None], torch.arange(n, device=self.device), input_pos_maxp1=n)
            caches = [block.attn.kv_cache for block in module.transformer.h]
            if saved is not None:
                for new, old in zip(caches, saved):
                    new.k, new.v = torch.cat([old.k, new.k]), torch.cat([old.v, new.v])
        except Exception:
            self._restore(batch, saved)
            raise
        batch.caches, batch.mask, batch.length = caches, module.mask_cache, length
        batch.rows.append(Row(job=job, matcher=StopMatcher(job.stop_tokens),
                              generator=new_generator(job, self.device), position=n))
        self._take_all(batch, logits[:, -1], [len(batch.rows) - 1])

    def _restore(self, batch: Batch, saved: Optional[list]) -> None:
        """After a failed prefill: the batch's caches cut back to its length (a grow that failed half-way: views, no
        new memory). Without rows (saved is None), nothing to keep. If even this fails, the batch's requests fail."""
        if saved is None:
            self._reset(batch)
            return
        try:
            for cache in saved:
                cache.k, cache.v = cache.k[:, :, :batch.length], cache.v[:, :, :batch.length]
                cache.max_cache_len = batch.length
        except Exception as e:
            self._fail_all(batch, e)

    def _fail_all(self, batch: Batch, error: Exception) -> None:
        """The batch is lost (its forward failed): every row's request gets the error, the cache is freed."""
        failed = [row.job for row in batch.rows]
        self._reset(batch)
        for job in failed:
            fail(job, error)

    def _step(self, batch: Batch) -> None:
        """One new token for every row of the batch."""
        from litgpt.model import build_mask_cache

        need = max(row.position for row in batch.rows) + 1
        if need > batch.length:
            batch.length = round_up(need, self.context)
            grow(batch.caches, batch.length)
            batch.mask = build_mask_cache(batch.length, self.device)
        module = self._use(batch)
        tokens = torch.tensor([[row.last] for row in batch.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in batch.rows], device=self.device)
        logits = module(tokens, positions, input_pos_maxp1=need)
        for row in batch.rows:
            row.position += 1
        self._take_all(batch, logits[:, -1], range(len(batch.rows)))

    def _take_all(self, batch: Batch, logits: torch.Tensor, indices) -> None:
        """Sample the next token of these rows (logits: one row of logits each, in the order of `indices`) and send
        their text; rows that are done leave the batch. A row whose sampling or text fails (e.g. non-finite
        probabilities) fails alone: the other rows go on."""
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        finished = set()
        for k, i in enumerate(indices):
            row = batch.rows[i]
            try:
                token = greedy[k] if row.generator is None else sample_row(logits[k], row.job, row.generator)
                done = take_token(self.tokenizer, row, token)
            except Exception as e:
                fail(row.job, e)
                done = True
            if done:
                finished.add(i)
        if finished:
            self._keep(batch, [i for i in range(len(batch.rows)) if i not in finished])

    def _drop_cancelled(self, batch: Batch) -> None:
        if any(row.job.cancelled for row in batch.rows):
            self._keep(batch, [i for i, row in enumerate(batch.rows) if not row.job.cancelled])

    def _keep(self, batch: Batch, keep: list[int]) -> None:
        """Only these rows stay in the batch (and in its KV caches)."""
        if not keep:
            self._reset(batch)
            return
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=self.device)
            for cache in batch.caches:
                cache.k, cache.v = cache.k.index_select(0, index), cache.v.index_select(0, index)
            batch.rows = [batch.rows[i] for i in keep]

    def _reset(self, batch: Batch) -> None:
        batch.rows, batch.caches, batch.mask, batch.length = [], None, None, 0
        batch.served.module.clear_kv_cache()  # frees the cache while idle (`_use` installs a batch's before use)


# ------------------------------------------------------------------------------------------------------ helpers


def round_up(n: int, limit: int) -> int:
    return min(limit, -(-n // CACHE_GRANULARITY) * CACHE_GRANULARITY)


def grow(caches: list, length: int) -> None:
    """Lengthen every row's KV cache to `length` positions; the new ones are empty."""
    for cache in caches:
        extra = length - cache.k.size(2)
        cache.k = torch.nn.functional.pad(cache.k, (0, 0, 0, extra))
        cache.v = torch.nn.functional.pad(cache.v, (0, 0, 0, extra))
        cache.max_cache_len = length


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
