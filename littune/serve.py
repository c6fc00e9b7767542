"""Serve: an OpenAI-compatible HTTP server for the base model, with or without a trained adapter.

    littune serve --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --adapter_path out/adapter_v2/my
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "m", "messages": [{"role": "user", "content": "Name three primary colors."}]}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Chat messages are rendered
with the prompt style `littune generate` would use (the adapter run's, else the model's chat template, else alpaca):
a conversation of several turns needs a chat template. /v1/completions continues the raw prompt text.

Request fields: messages (text content; OpenAI's text parts are joined) or prompt (one string), max_tokens
(max_completion_tokens; default: the rest of the context), temperature (default 1.0, as OpenAI's API; 0 = greedy),
top_p, seed, stop (up to 4 strings of up to 256 characters), stream, stream_options.include_usage; two extensions,
named as vLLM names them: top_k and ignore_eos. Fields littune cannot honour (n > 1, penalties, logit_bias,
logprobs, echo, best_of, suffix) are refused with 400 rather than ignored; other unknown fields are ignored. usage
counts the prompt's tokens and the tokens generated, a stop token included.

Limits, so that no request holds up the others: a body over 16 MB gets 413; a request that finds
--max_concurrency running and --max_queue waiting gets 429 before its body is parsed; a body is parsed, its messages
rendered and its prompt tokenised on a worker thread (the event loop goes on answering meanwhile); prompt text longer
than 16 characters per token of context (4,096 for a 256-token context), or more messages than the context has
tokens, is refused with 400 before it is rendered or tokenised; stop strings are limited to 4 of 256 characters.

Web pages cannot drive the server (the class of Ollama's CVE-2024-28224: a page can POST text/plain or a form to any
site without asking, and with DNS rebinding its own name resolves to 127.0.0.1): request bodies must come with
`Content-Type: application/json` (else 415, and a browser asks the server before sending that cross-site, which this
server never allows); on a loopback --host, a request whose Host header is not localhost, 127.x.x.x or [::1] (any
port) or a name given with --allowed_hosts (e.g. a reverse proxy's) gets 403; on another --host the Host header is
checked only when --allowed_hosts is given.

Why FastAPI + uvicorn directly and not LitServe (measured on the 2-core development machine, alternating rounds of
the same tiny model behind both, one request at a time): requests/s and latency were within the run-to-run noise
of each other, while LitServe ran 5 processes and 1.7 GB of resident memory (0.5 GB here, one process), was still
running 20 s after Ctrl-C, and its OpenAI spec serves only /v1/chat/completions: /v1/completions would be a second
LitAPI, i.e. a second inference process holding a second copy of the model.

How requests are answered: one engine thread owns the model and decodes every admitted request together, one token
per step for all of them (continuous batching): a new request is prefilled alone, as `littune generate` prefills
(only the last position goes through the vocabulary projection), and joins the batch at the next step; a finished
or abandoned one leaves it. Each row keeps its own positions, so a row attends only to its own tokens, as in
`littune.sampling.batched_greedy`. Up to --max_concurrency requests are in the batch; further ones wait in order;
beyond --max_queue waiting ones a request gets 429 with Retry-After. Sampling is `littune generate`'s
(`littune.sampling.sample_token`: litgpt's rule, top_k, temperature, top_p, computed in float32; a temperature
below 1e-5 is greedy, as vLLM's) with a random generator of the request's own, so a `seed` gives the same draws
whatever else the server is doing. A request that fails fails alone: a draw that fails ends its own row, a prefill
that fails (e.g. out of memory) puts the other rows' KV caches back; only a failed step of the whole batch fails
the requests in it. Greedy answers equal `littune generate`'s on CPU in float32 (the tests;
scripts/bench_serve.py on SmolLM2, four at once included); on a GPU in bfloat16 a batch's other matrix shapes round
differently and can part an answer from generate's where two tokens are about equally likely.
"""

import asyncio
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from littune.common import Check, UserError, checked, first_line
from littune.model import Precision
from littune.prepared import encode

SERVER_PACKAGES = ("fastapi", "uvicorn")
API_KEY_ENV = "LITTUNE_API_KEY"
MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before it is read into memory
MAX_STOP_STRINGS = 4  # as OpenAI's API
# Characters in one stop string. Each costs the engine thread work in proportion to its length at every token, and
# text that may begin one is held back from a stream (up to its length - 1 characters); real ones (end-of-turn
# markers, "\n\nUser:", "```") are a few dozen characters at most. 4 strings of 200k characters cost 41 ms a token.
MAX_STOP_CHARS = 256
# prompt text longer than this many characters per token of context cannot fit (English text averages about 4
# characters a token; long runs of spaces or repeated punctuation rarely reach 16): refused before it is tokenised
MAX_PROMPT_CHARS_PER_TOKEN = 16
CACHE_GRANULARITY = 256  # the KV cache grows in steps of this many positions (fewer reallocations)
RETRY_AFTER_S = 1


@checked
def serve(
    checkpoint_dir: Path,
    adapter_path: Optional[Path] = None,
    host: str = "127.0.0.1",
    port: Annotated[int, Check(ge=1, le=65535)] = 8000,
    api_key: Optional[str] = None,
    precision: Optional[Precision] = None,
    max_concurrency: Annotated[int, Check(ge=1, le=1024)] = 4,
    max_queue: Annotated[int, Check(ge=0)] = 64,
    prompt_style: Optional[str] = None,
    system: Optional[str] = None,
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info",
    allowed_hosts: Optional[str] = None,
) -> None:
    """Serve the model (and adapter) over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models.

    Arguments:
        checkpoint_dir: The converted base model.
        adapter_path: An adapter file, or a run folder (its final adapter). Without it, the base model answers.
        host: The address to listen on; 127.0.0.1 answers this machine only, 0.0.0.0 every network (then set an API key).
        port: The TCP port to listen on.
        api_key: Clients must send "Authorization: Bearer KEY" (default: the LITTUNE_API_KEY environment variable; none: no check). The environment variable keeps the key out of the process list.
        precision: 32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: as littune generate's).
        max_concurrency: Requests answered at once, decoded together as one batch; further ones wait.
        max_queue: Requests that may wait for a place; beyond them a request gets 429 with Retry-After.
        prompt_style: The prompt template for chat messages: chat (the model's own chat template) or a litgpt style name (default: the one saved with the adapter, else chat where the model has a template, else alpaca).
        system: A default system message for the chat prompt style (a request's own system message replaces it).
        log_level: uvicorn's log level (info logs each request, never the key).
        allowed_hosts: Host names requests may be addressed to besides localhost, 127.x.x.x and [::1], comma-separated, without a port (e.g. the name a reverse proxy forwards). On a loopback --host any other Host header gets 403 (DNS rebinding); on another --host, the Host header is checked only when this is given.
    """
    key = resolve_api_key(api_key)
    hosts = host_allowlist(host, allowed_hosts)
    require_server_packages()
    if not is_loopback(host) and key is None:
        print(f"littune serve: warning: --host {host} accepts connections from other machines and no API key is set; "
              f"anyone who can reach port {port} can use the model (set {API_KEY_ENV} or --api_key)",
              file=sys.stderr, flush=True)
    sock = bind_socket(host, port)  # before loading the model: a port in use fails now, not after minutes
    try:
        service = load_service(checkpoint_dir, adapter_path, precision=precision, max_concurrency=max_concurrency,
                               max_queue=max_queue, api_key=key, prompt_style=prompt_style, system=system)
        service.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
        service.allowed_hosts = hosts
        server = make_server(build_app(service), service, log_level=log_level)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
            pass
    finally:
        sock.close()
    print("littune serve: stopped", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- set-up


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    """--api_key, else $LITTUNE_API_KEY, else None (no check). The key is never printed or written anywhere."""
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api_key is empty; give a key, or leave it out (and {API_KEY_ENV} unset) for no check")
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def require_server_packages() -> None:
    missing = [name for name in SERVER_PACKAGES if not _importable(name)]
    if missing:
        raise UserError(f"littune serve needs {' and '.join(missing)}: pip install 'littune[serve]'")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        return False


def host_allowlist(host: str, allowed_hosts: Optional[str]) -> Optional[frozenset]:
    """The Host header values accepted besides loopback ones: --allowed_hosts as a set of lower-case names; an empty
    set on a loopback --host without it; None (any Host) on another --host without it."""
    if allowed_hosts is None:
        return frozenset() if is_loopback(host) else None
    names = set()
    for item in allowed_hosts.split(","):
        name = item.strip().lower()
        name = name[1:-1] if name.startswith("[") and name.endswith("]") else name.rstrip(".")
        if not (_is_ip(name) or re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name)):
            raise UserError(f"--allowed_hosts: {item.strip()!r} is not a host name; give names such as "
                            f"proxy.example.com or addresses, comma-separated, without a port")
        names.add(name)
    return frozenset(names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_of(header: str) -> Optional[str]:
    """The host name of a Host header ("localhost:8000" -> "localhost", "[::1]:8000" -> "::1"), lower case, without a
    trailing dot; None when it is not of that form."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = header.partition(":")
        port = colon + port
    if port and not re.fullmatch(r":\d{1,5}", port):
        return None
    return name.rstrip(".")


def host_allowed(header: Optional[str], allowed: Optional[frozenset]) -> bool:
    """Whether a request's Host header may be answered: always when no list applies (allowed is None) or the
    request has no Host header (browsers always send one); else a loopback name or address, or a listed name."""
    if allowed is None or header is None:
        return True
    name = host_of(header)
    return name is not None and (name in allowed or is_loopback(name))


def host_refusal(host: str, allowed: frozenset) -> str:
    names = ", ".join(["localhost", "127.x.x.x", "[::1]", *sorted(allowed)])
    return (f"requests addressed to Host {host!r} are not answered here, only those to {names}; to answer another "
            f"name (e.g. a reverse proxy's), start littune serve with --allowed_hosts NAME")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (handed to uvicorn), or one clear line saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "; is another server running there? pick another --port" if e.errno == 98 else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from e
    sock.set_inheritable(True)
    return sock


@dataclass(eq=False)
class Service:
    """What the HTTP handlers share: the engine, how to turn a request into tokens, the limits, the key."""

    engine: "Engine"
    tokenizer: Any
    style: Any
    model_id: str
    context: int  # the most tokens (prompt + answer) one request can have
    max_concurrency: int
    max_queue: int
    stop_tokens: tuple = ()  # the prompt style's (EOS, a chat template's end-of-turn token)
    url: str = ""  # where it listens, for the start-up line
    api_key: Optional[str] = None
    allowed_hosts: Optional[frozenset] = frozenset()  # Host names accepted besides loopback ones; None: any
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # requests admitted and not yet answered (touched only on the event loop's thread)


def load_service(checkpoint_dir: Path, adapter_path: Optional[Path] = None, *, precision: Optional[str] = None,
                 max_concurrency: int = 4, max_queue: int = 64, api_key: Optional[str] = None,
                 prompt_style: Optional[str] = None, system: Optional[str] = None) -> Service:
    """Load the model (one copy, on one device) and the prompt style `littune generate` would use with it."""
    import lightning as L

    from littune.generate import choose_prompt_style
    from littune.model import check_precision, default_precision, load_for_inference

    checkpoint_dir = Path(checkpoint_dir)
    precision = precision or default_precision()
    check_precision(precision)
    fabric = L.Fabric(devices=1, precision=precision, accelerator="auto")
    model, tokenizer, run_dir = load_for_inference(fabric, checkpoint_dir, adapter_path)
    style = choose_prompt_style(prompt_style, run_dir, checkpoint_dir, system)
    config = model.config
    # a sliding-window layer keeps only the window in its cache: beyond it this engine's cache would be wrong
    context = min(config.block_size, config.sliding_window_size or config.block_size)
    model_id = checkpoint_dir.resolve().name + (f"+{run_dir.resolve().name}" if run_dir is not None else "")
    return Service(engine=Engine(model, tokenizer, max_concurrency, context), tokenizer=tokenizer, style=style,
                   model_id=model_id, context=context, max_concurrency=max_concurrency, max_queue=max_queue,
                   stop_tokens=tuple(style.stop_tokens(tokenizer)), api_key=api_key)


def make_server(app, service: Service, log_level: str = "info"):
    """A uvicorn server whose Ctrl-C also ends the answers in progress (they get an error and close), so the
    server stops at once instead of waiting for long generations."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.engine.stopping = True  # a flag only: this runs inside a signal handler, no locks here
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    return Server(config)


# ------------------------------------------------------------------------------------------------------- engine


@dataclass(eq=False)
class Job:
    """One request's generation: what to generate, and where to send what happens (from the engine's thread)."""

    prompt: Any  # 1-D tensor of token ids on the model's device
    max_new_tokens: int
    emit: Callable[[tuple], None]  # ("text", piece) ... then ("end", reason, prompt_tokens, completion_tokens) or
    # ("error", status, message); must be safe to call from another thread
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
    matcher: Any  # littune.sampling.StopMatcher
    generator: Any  # torch.Generator or None (greedy)
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
        from littune.model import unwrap

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
        import torch

        with torch.no_grad():  # not inference_mode, as in littune.sampling: the model stays usable by autograd
            while not self.stopping:
                self.wakeup.clear()  # before looking at `pending`: a submit after this wakes the wait below
                try:
                    self._drop_cancelled()
                    while len(self.rows) < self.max_concurrency and self.pending and not self.stopping:
                        job = self.pending.popleft()
                        if not job.cancelled:
                            try:
                                self._prefill(job)
                            except Exception as e:  # this prompt failed (e.g. out of memory): this request only
                                _fail(job, e)
                    if self.rows:
                        self._step()
                    elif not self.pending:
                        self.wakeup.wait(0.5)  # a timeout, so `stopping` set by a signal handler is seen
                except Exception as e:  # the batch's forward failed (e.g. out of memory): its requests, keep serving
                    self._fail_all(e)
        for leftover in [row.job for row in self.rows] + list(self.pending):
            _emit(leftover, ("error", 503, "the server is shutting down"))
        self.pending.clear()
        self._reset()

    def _prefill(self, job: Job) -> None:
        """The prompt alone through the model, on a fresh one-row cache (as `littune generate` prefills), then that
        cache joins the batch's. If anything fails, the other rows' caches are put back and only this job fails."""
        import torch

        from littune.sampling import last_position_only

        blocks = self.module.transformer.h
        saved = [block.attn.kv_cache for block in blocks] if self.rows else None
        try:
            length = max(self.cache_length, _round_up(job.prompt.numel() + 1, self.context))
            if saved is not None and length > self.cache_length:
                self._grow(length, saved)
            self.module.set_kv_cache(batch_size=1, max_seq_length=length, device=self.device)
            with last_position_only(self.module):
                logits = self.module(job.prompt[None], torch.arange(job.prompt.numel(), device=self.device),
                                     input_pos_maxp1=job.prompt.numel())
            if saved is not None:
                for block, old in zip(blocks, saved):
                    new = block.attn.kv_cache
                    new.k, new.v = torch.cat([old.k, new.k]), torch.cat([old.v, new.v])
        except Exception:
            self._restore(saved)
            raise
        self.cache_length = length
        row = Row(job=job, matcher=_stop_matcher(job.stop_tokens), generator=_generator(job, self.device),
                  position=job.prompt.numel())
        self.rows.append(row)
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
            _fail(job, error)

    def _step(self) -> None:
        """One new token for every row."""
        import torch

        need = max(row.position for row in self.rows) + 1
        if need > self.cache_length:
            self._grow(_round_up(need, self.context))
        tokens = torch.tensor([[row.last] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        logits = self.module(tokens, positions, input_pos_maxp1=need)
        for row in self.rows:
            row.position += 1
        self._take_all(logits[:, -1], range(len(self.rows)))

    def _take_all(self, logits, indices) -> None:
        """Sample the next token of these rows (logits: one row of logits each, in the order of `indices`) and send
        their text; rows that are done leave the batch. A row whose sampling or text fails (e.g. non-finite
        probabilities) fails alone: the other rows go on."""
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        finished = set()
        for k, i in enumerate(indices):
            row = self.rows[i]
            try:
                token = greedy[k] if row.generator is None else sample_row(logits[k], row.job, row.generator)
                done = self._take(row, token)
            except Exception as e:
                _fail(row.job, e)
                done = True
            if done:
                finished.add(i)
        if finished:
            self._keep([i for i in range(len(self.rows)) if i not in finished])

    def _take(self, row: Row, token: int) -> bool:
        """Add a sampled token to a row and send the text it completes; True when the row is done."""
        job, matcher = row.job, row.matcher
        row.last = token
        matcher.add(token)
        # litgpt generate_fn's rule: tokens that may start a stop sequence are held back, at the limit all are output
        reason = "stop" if matcher.stopped else ("length" if len(matcher.tokens) >= job.max_new_tokens else None)
        ids = matcher.output if reason else matcher.tokens[:matcher.safe]
        piece, row.emitted, hit = advance_text(self.tokenizer, ids, row.emitted, job.stop_strings, reason is not None)
        if piece:
            _emit(job, ("text", piece))
        if hit:
            reason = "stop"
        if reason:
            _emit(job, ("end", reason, job.prompt.numel(), len(matcher.tokens)))
            return True
        return False

    def _drop_cancelled(self) -> None:
        if any(row.job.cancelled for row in self.rows):
            self._keep([i for i, row in enumerate(self.rows) if not row.job.cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Only these rows stay in the batch (and in the KV cache)."""
        import torch

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
        import torch
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


def _round_up(n: int, limit: int) -> int:
    return min(limit, -(-n // CACHE_GRANULARITY) * CACHE_GRANULARITY)


def _emit(job: Job, event: tuple) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the event loop is gone (server stopping): nobody is listening any more
        job.cancelled = True


def _stop_matcher(stop_tokens: tuple):
    from littune.sampling import StopMatcher

    return StopMatcher(stop_tokens)


def _fail(job: Job, error: Exception) -> None:
    traceback.print_exception(error, file=sys.stderr)
    _emit(job, ("error", 500, f"generation failed: {type(error).__name__}: {first_line(error)}"))


def _generator(job: Job, device):
    import torch

    from littune.sampling import is_greedy

    if is_greedy(job.temperature, job.top_p):
        return None  # greedy: no randomness
    generator = torch.Generator(device=device)
    if job.seed is None:
        generator.seed()
    else:
        generator.manual_seed(job.seed)
    return generator


def sample_row(logits, job: Job, generator) -> int:
    """The request's next token: `littune.sampling.sample_token`, as `littune generate` draws (in float32, greedy
    below a tiny temperature), from the request's own generator: the same draws `littune generate --seed` makes for
    this request alone on CPU (its global generator, seeded the same, gives the same stream)."""
    from littune.sampling import sample_token

    return sample_token(logits, job.temperature, job.top_k, job.top_p, generator)


def advance_text(tokenizer, ids: list[int], emitted: str, stop_strings: tuple, final: bool) -> tuple[str, str, bool]:
    """(new text to send, all text sent, a stop string was hit) after the answer's tokens became `ids`.

    The whole answer is decoded each time (per-token decoding loses SentencePiece's spaces and splits multi-byte
    characters), as littune.sampling.stream_text does. A stop string ends the text before its first match; text
    that may be the start of a stop string is held back until it is known not to be one. Text already sent is known
    not to begin a stop string, so only the text after it is searched: at most the held-back text (shorter than the
    longest stop string) and this token's new text.
    """
    import torch

    text = tokenizer.decode(torch.tensor(ids, dtype=torch.long)) if ids else ""
    if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
        return "", emitted, False
    hit = False
    if stop_strings:
        cuts = [i for s in stop_strings if (i := text.find(s, len(emitted))) >= 0]
        if cuts:
            text, hit = text[:min(cuts)], True
        elif not final:
            text = text[:len(text) - _possible_stop_start(text, stop_strings, len(emitted))]
    if not text.startswith(emitted):  # the decoder changed text already sent (rare): send nothing more now
        return "", emitted, hit
    return text[len(emitted):], text, hit


def _possible_stop_start(text: str, stop_strings: tuple, start: int = 0) -> int:
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


# ----------------------------------------------------------------------------------------------- requests


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _wrong(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"'{name}' must be {expected}, got {_json_type(value)}", param=name, code="invalid_type")


def number_field(body: dict, name: str, check: Check, default: Optional[float]) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(name, "a number", value)
    if not check.allows(value):
        raise ApiError(400, f"'{name}' must be {check.describe()}, got {value}", param=name, code="invalid_value")
    return float(value)


def integer_field(body: dict, name: str, check: Check, default: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    if not check.allows(value):
        raise ApiError(400, f"'{name}' must be {check.describe()}, got {value}", param=name, code="invalid_value")
    return value


def bool_field(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong(name, "a boolean", value)
    return value


def unsupported(body: dict, name: str, allowed: Callable[[Any], bool], what: str) -> None:
    """A field littune cannot honour: refused unless it has its neutral value (silently ignoring it would lie)."""
    if name in body and body[name] is not None and not allowed(body[name]):
        raise ApiError(400, f"'{name}' is not supported by littune serve ({what})", param=name, code="unsupported")


def sampling_fields(body: dict, prompt_tokens: int, context: int, *, chat: bool) -> dict:
    """The generation settings of a request, checked: Job keyword arguments."""
    temperature = number_field(body, "temperature", Check(ge=0, le=2), 1.0)  # omitted: 1.0, as OpenAI's API
    top_p = number_field(body, "top_p", Check(ge=0, le=1), 1.0)
    top_k = integer_field(body, "top_k", Check(ge=1))  # an extension (vLLM's name); OpenAI's API has none
    seed = integer_field(body, "seed", Check(ge=-(2 ** 63), lt=2 ** 64))
    limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer_field(body, limit, Check(ge=1))
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens, with "
                            f"room for at least one more", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus '{limit}' {max_tokens} exceeds this model's "
                            f"context of {context} tokens; lower '{limit}' to at most {room}", param=limit,
                       code="context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or an array of them", param="stop", code="invalid_type")
    if stop is not None and len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop",
                       code="invalid_value")
    if stop is not None and max(map(len, stop), default=0) > MAX_STOP_CHARS:
        raise ApiError(400, f"a 'stop' string has at most {MAX_STOP_CHARS} characters, got one of "
                            f"{max(map(len, stop))}", param="stop", code="invalid_value")
    unsupported(body, "n", lambda v: v == 1 and not isinstance(v, bool), "one answer per request: n = 1")
    for name in ("presence_penalty", "frequency_penalty"):
        unsupported(body, name, lambda v: v == 0 and not isinstance(v, bool), "only 0")
    unsupported(body, "logit_bias", lambda v: v == {}, "no logit bias")
    unsupported(body, "logprobs", lambda v: v is False or v == 0, "no log probabilities")
    unsupported(body, "top_logprobs", lambda v: v == 0, "no log probabilities")
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_strings=tuple(stop or ()),
                max_new_tokens=max_tokens if max_tokens is not None else room)


def stream_fields(body: dict) -> tuple[bool, bool]:
    """(stream, include usage in a last chunk)."""
    stream = bool_field(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    return stream, bool_field(options, "include_usage")


def parse_messages(body: dict, max_messages: Optional[int] = None) -> list[dict]:
    """The conversation as [{"role", "content"}] with text content (OpenAI's text parts joined); at most
    `max_messages` of them (the context's tokens: a chat template spends at least one token on each turn)."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content}", param="messages",
                       code="invalid_type")
    if max_messages is not None and len(messages) > max_messages:
        raise ApiError(400, f"'messages' has {len(messages)} messages, more than this model's {max_messages}-token "
                            f"context can hold", param="messages", code="context_length_exceeded")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong(where, "an object with role and content", message)
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, developer, user or assistant, got {role!r}",
                           param=f"{where}.role", code="invalid_value")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts ({{type: text, text}}) are supported",
                               param=f"{where}.content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _wrong(f"{where}.content", "a string or an array of text parts", content)
        parsed.append({"role": role, "content": content})
    return parsed


def render_messages(style, messages: list[dict]) -> str:
    """The prompt text of a conversation in the served prompt style.

    A chat template renders any conversation, as `littune generate` renders one message (its default system
    message first when the request has none; a leading BOS dropped where the tokenizer adds it). A litgpt style
    (e.g. Alpaca) has a single instruction: one user message, after an optional system message (its sys_prompt).
    """
    from littune.prompts import ChatTemplate

    if isinstance(style, ChatTemplate):
        if style.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": style.system}] + messages
        try:
            text = style.render(messages, add_generation_prompt=True)
        except UserError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from e
        if style.strip_bos and style.bos_token and text.startswith(style.bos_token):
            text = text[len(style.bos_token):]
        return text
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    if len(rest) != 1 or rest[0]["role"] != "user":
        raise ApiError(400, f"this model's prompt style ({type(style).__name__}) has no chat template: it takes one "
                            f"user message (after an optional system message), not a conversation of several turns; "
                            f"serve a model with a chat template, or an adapter prepared with --prompt_style chat",
                       param="messages", code="invalid_value")
    return style.apply(rest[0]["content"], **({"sys_prompt": system} if system is not None else {}))


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt", code="invalid_type")
    unsupported(body, "echo", lambda v: v is False, "the prompt is not echoed")
    unsupported(body, "best_of", lambda v: v == 1 and not isinstance(v, bool), "best_of = 1")
    unsupported(body, "suffix", lambda v: v == "", "no suffix")
    return prompt


@dataclass(eq=False)
class Prepared:
    """A request turned into what the engine needs."""

    prompt: Any  # 1-D tensor of token ids on the model's device
    settings: dict  # Job keyword arguments: sampling, stop strings, max_new_tokens
    stop_tokens: tuple
    stream: bool
    include_usage: bool


def prepare_request(service: Service, raw: bytes, kind: str) -> Prepared:
    """The body of a /v1/chat/completions ("chat") or /v1/completions ("text") request, checked, rendered and
    tokenised. Runs on a worker thread: its cost grows with the body's size. Prompt text longer than
    MAX_PROMPT_CHARS_PER_TOKEN characters per token of context is refused before it is rendered or tokenised."""
    body = parse_body(raw)
    chat = kind == "chat"
    limit = MAX_PROMPT_CHARS_PER_TOKEN * service.context
    if chat:
        messages = parse_messages(body, max_messages=service.context)
        check_prompt_chars(sum(len(m["content"]) for m in messages), limit, service.context, "messages")
        text = render_messages(service.style, messages)
        check_prompt_chars(len(text), limit, service.context, "messages")  # with the template's own text
        ignore_eos = bool_field(body, "ignore_eos")
        stop_tokens = () if ignore_eos else tuple(service.stop_tokens)
    else:
        text = parse_prompt(body)
        check_prompt_chars(len(text), limit, service.context, "prompt")
        eos = service.tokenizer.eos_id
        stop_tokens = () if bool_field(body, "ignore_eos") or eos is None else ([eos],)
    stream, include_usage = stream_fields(body)
    prompt = encode(service.tokenizer, text).to(service.engine.device)
    if prompt.numel() == 0:
        raise ApiError(400, "'prompt' is empty (no tokens)", param="prompt", code="invalid_value")
    settings = sampling_fields(body, prompt.numel(), service.context, chat=chat)
    return Prepared(prompt=prompt, settings=settings, stop_tokens=stop_tokens, stream=stream,
                    include_usage=include_usage)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also bytes that are not UTF-8, absurdly deep nesting
        raise ApiError(400, f"the request body is not valid JSON ({first_line(e)})", code="invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_type")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _wrong("model", "a string", body["model"])
    return body


def check_prompt_chars(chars: int, limit: int, context: int, param: str) -> None:
    if chars > limit:
        raise ApiError(400, f"the prompt has {chars} characters, more than the {limit} littune serve tokenises for "
                            f"this model's {context}-token context ({MAX_PROMPT_CHARS_PER_TOKEN} characters per "
                            f"token); shorten it", param=param, code="context_length_exceeded")


# ---------------------------------------------------------------------------------------------------- the app


def build_app(service: Service):
    """The FastAPI application: OpenAI's routes over `service`; the engine thread runs while the app does."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        auth = "API key required" if service.api_key else "no API key"
        print(f"littune serve: {service.model_id} ready {('on ' + service.url + ' ') if service.url else ''}"
              f"({service.context}-token context, up to "
              f"{service.max_concurrency} requests at once, {service.max_queue} waiting, {auth})",
              file=sys.stderr, flush=True)
        yield
        await asyncio.to_thread(service.engine.stop)

    app = FastAPI(title="littune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    class HostCheck:
        """Every route: a web page whose name resolves to this machine (DNS rebinding) names itself in Host."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
                if not host_allowed(host, service.allowed_hosts):
                    await error_response(ApiError(403, host_refusal(host, service.allowed_hosts),
                                                  code="host_not_allowed"))(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    app.add_middleware(HostCheck)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):  # 404, 405: OpenAI's error body instead of FastAPI's {"detail"}
        return error_response(ApiError(error.status_code, f"{error.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def unexpected(request, error):  # a bug: the client gets an error body, the log a traceback
        return error_response(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error"))

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        import hmac

        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MB")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MB")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        # no key needed (load balancers probe it), so it names nothing: the model's name is behind the key
        return {"status": "ok", "running": len(service.engine.rows), "waiting": service.engine.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "littune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "text")

    async def answer(request: Request, kind: str):
        authorize(request)
        # JSON only: a web page can send text/plain or a form to another site without asking, not application/json
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                                f"{media_type or 'no Content-Type'}", code="unsupported_media_type")
        raw = await read_body(request)  # no place taken yet: a client that sends its body slowly holds none
        # the queue before anything that costs time: a request that cannot get a place costs nothing more
        if service.in_flight >= service.max_concurrency + service.max_queue:
            raise ApiError(429, f"the server is busy ({service.max_concurrency} requests running, "
                                f"{service.max_queue} waiting); retry later", kind="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        service.in_flight += 1  # this request's place, from now until it ends, whichever way
        job: Optional[Job] = None
        released = False

        def release() -> None:  # exactly once, whichever way the request ends; frees its place in the batch
            nonlocal released
            if not released:
                released = True
                service.in_flight -= 1
                if job is not None:
                    job.cancelled = True

        try:
            # parsing, rendering and tokenising take time in proportion to the request: on a worker thread, so the
            # event loop goes on answering everyone else (/health included) meanwhile
            prepared = await run_in_threadpool(prepare_request, service, raw, kind)
        except BaseException:
            release()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(prompt=prepared.prompt, stop_tokens=prepared.stop_tokens,
                  emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event), **prepared.settings)
        stream, include_usage = prepared.stream, prepared.include_usage

        async def watch_disconnect() -> None:
            # the body has been read: the next ASGI message is the disconnect (or the end of the response)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            release()
            events.put_nowait(("gone",))

        watcher = asyncio.create_task(watch_disconnect())
        service.engine.submit(job)
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": service.model_id}
        if stream:
            return StreamingResponse(sse_events(events, meta, kind, include_usage, release, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pieces = []
            while True:
                event = await events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "end":
                    return completion_body(meta, kind, "".join(pieces), event[1], event[2], event[3])
                elif event[0] == "error":
                    kind_ = "server_error" if event[1] >= 500 else "invalid_request_error"
                    return error_response(ApiError(event[1], event[2], kind=kind_))
                else:  # the client has gone: nobody reads this
                    return error_response(ApiError(499, "client closed the request"))
        finally:
            release()
            watcher.cancel()

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(meta: dict, kind: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {**meta, "object": obj, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk(meta: dict, kind: str, piece: Optional[str], reason: Optional[str] = None, first: bool = False) -> str:
    """One Server-Sent Event in OpenAI's chunk format."""
    if kind == "chat":
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": piece} if piece else {})
        payload = {**meta, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
    else:
        payload = {**meta, "object": "text_completion",
                   "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}]}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_events(events: asyncio.Queue, meta: dict, kind: str, include_usage: bool, release: Callable,
                     watcher) -> Any:
    try:
        if kind == "chat":
            yield chunk(meta, kind, None, first=True)
        while True:
            event = await events.get()
            if event[0] == "text":
                yield chunk(meta, kind, event[1])
            elif event[0] == "end":
                yield chunk(meta, kind, None, reason=event[1])
                if include_usage:
                    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                    payload = {**meta, "object": obj, "choices": [], "usage": usage(event[2], event[3])}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
                return
            elif event[0] == "error":
                error = ApiError(event[1], event[2], kind="server_error" if event[1] >= 500 else
                                 "invalid_request_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:  # the client has gone
                return
    finally:  # also when the response is cancelled because the client disconnected
        release()
        watcher.cancel()
