"""Serve: an OpenAI-compatible HTTP server for the base model, with or without trained adapters.

    littune serve --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --adapter_path out/adapter_v2/my
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "m", "messages": [{"role": "user", "content": "Name three primary colors."}]}'

    littune serve --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapter sst=out/lora/sst --adapter rev=out/adapter_v2/rev       # then "model": "sst" or "rev"

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.

Models: with --adapter NAME=PATH (once per adapter; LoRA and adapter_v2 runs of the same base may be mixed), a
request's `model` names the adapter that answers, or the base model by its checkpoint folder's name; another name
gets 404 model_not_found, as OpenAI's API answers. Without --adapter there is one model, which answers whatever the
`model` field says. The base weights are in memory once whatever the number of adapters (`models`); requests for
different adapters are decoded in turn, one adapter's batch per step (`engine`). Each adapter's chat messages are
written in its run's prompt style, as `littune generate --adapter_path` writes them.

The package, one concern per file: this file is the command (flags, the listening socket, loading the model);
`models` the base and its adapters on one copy of the base weights; `engine` the thread that batches and decodes
requests (no HTTP in it); `protocol` OpenAI's request fields, errors and response shapes; `app` the routes,
Server-Sent Events, the API key and the Host checks, with the limits that keep one request from holding up the
others.

Why FastAPI + uvicorn directly and not LitServe (measured on the 2-core development machine, alternating rounds of
the same tiny model behind both, one request at a time): requests/s and latency were within the run-to-run noise
of each other, while LitServe ran 5 processes and 1.7 GB of resident memory (0.5 GB here, one process), was still
running 20 s after Ctrl-C, and its OpenAI spec serves only /v1/chat/completions: /v1/completions would be a second
LitAPI, i.e. a second inference process holding a second copy of the model.
"""

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from littune.common import Check, UserError, checked
from littune.model import Precision
from littune.quantize import Quantize, check_quantize
from littune.serve.app import build_app, host_allowlist, is_loopback
from littune.serve.engine import Engine, Served
from littune.serve.models import Model, load_models, parse_adapter_flags
from littune.serve.protocol import ApiError

SERVER_PACKAGES = ("fastapi", "uvicorn")
API_KEY_ENV = "LITTUNE_API_KEY"


@checked
def serve(
    checkpoint_dir: Path,
    adapter_path: Optional[Path] = None,
    adapter: Optional[list[str]] = None,
    host: str = "127.0.0.1",
    port: Annotated[int, Check(ge=1, le=65535)] = 8000,
    api_key: Optional[str] = None,
    precision: Optional[Precision] = None,
    quantize: Optional[Quantize] = None,
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
        adapter: A named adapter, NAME=PATH (a run folder or adapter file), given once per adapter: --adapter sst=out/lora/sst --adapter rev=out/adapter_v2/rev. A request's model field picks one by NAME (the base model: the checkpoint folder's name); one copy of the base weights serves them all.
        host: The address to listen on; 127.0.0.1 answers this machine only, 0.0.0.0 every network (then set an API key).
        port: The TCP port to listen on.
        api_key: Clients must send "Authorization: Bearer KEY" (default: the LITTUNE_API_KEY environment variable; none: no check). The environment variable keeps the key out of the process list.
        precision: 32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: as littune generate's).
        quantize: The base model's linear layers in 4 bits (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq) or 8 bits (bnb.int8) with bitsandbytes, quantized while loading (pip install 'littune[quantize]'); with --adapter_path or no adapter (not with named --adapter ones).
        max_concurrency: Requests answered at once, decoded together as one batch; further ones wait.
        max_queue: Requests that may wait for a place; beyond them a request gets 429 with Retry-After.
        prompt_style: The prompt template for chat messages: chat (the model's own chat template) or a litgpt style name (default: the one saved with the adapter, else chat where the model has a template, else alpaca).
        system: A default system message for the chat prompt style (a request's own system message replaces it).
        log_level: uvicorn's log level (info logs each request, never the key).
        allowed_hosts: Host names requests may be addressed to besides localhost, 127.x.x.x and [::1], comma-separated, without a port (e.g. the name a reverse proxy forwards). On a loopback --host any other Host header gets 403 (DNS rebinding); on another --host, the Host header is checked only when this is given.
    """
    key = resolve_api_key(api_key)
    hosts = host_allowlist(host, allowed_hosts)
    if adapter is not None and adapter_path is not None:
        raise UserError("--adapter_path and --adapter: give one adapter with --adapter_path, or name each with "
                        "--adapter NAME=PATH (once per adapter), not both")
    adapters = parse_adapter_flags(adapter, Path(checkpoint_dir).resolve().name) if adapter is not None else None
    if quantize is not None and adapters is not None:
        raise UserError(f"--quantize {quantize} with named --adapter ones: the adapters share one base model's "
                        f"tensors, which a quantized base does not lend; serve one adapter with --adapter_path, or "
                        f"drop --quantize")
    check_quantize(quantize)
    require_server_packages()
    if not is_loopback(host) and key is None:
        print(f"littune serve: warning: --host {host} accepts connections from other machines and no API key is set; "
              f"anyone who can reach port {port} can use the model (set {API_KEY_ENV} or --api_key)",
              file=sys.stderr, flush=True)
    sock = bind_socket(host, port)  # before loading the model: a port in use fails now, not after minutes
    try:
        service = load_service(checkpoint_dir, adapter_path, adapters=adapters, precision=precision,
                               max_concurrency=max_concurrency, max_queue=max_queue, api_key=key,
                               prompt_style=prompt_style, system=system, quantize=quantize)
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
    """What the HTTP handlers share: the engine, the models a request can name, the limits, the key."""

    engine: Engine
    tokenizer: Any
    models: dict[str, Model]  # name -> model, the base first
    named: bool  # a request's `model` must name one of them (--adapter); else the one model answers any name
    context: int  # the most tokens (prompt + answer) one request can have
    max_concurrency: int
    max_queue: int
    url: str = ""  # where it listens, for the start-up line
    api_key: Optional[str] = None
    allowed_hosts: Optional[frozenset] = frozenset()  # Host names accepted besides loopback ones; None: any
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # requests admitted and not yet answered (touched only on the event loop's thread)

    def pick(self, name: Optional[str]) -> Model:
        """The model a request's `model` field names (any name, or none, when only one is served)."""
        if not self.named:
            return next(iter(self.models.values()))
        if name is None:
            raise ApiError(400, f"'model' is required: one of {', '.join(self.models)}", param="model",
                           code="missing_required_parameter")
        if name not in self.models:
            # the name is the client's: a 1 MB name gets its first 100 characters back, not a 1 MB reply
            shown = name if len(name) <= 100 else f"{name[:100]}... ({len(name):,} characters)"
            raise ApiError(404, f"The model '{shown}' does not exist; this server has {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]


def load_service(checkpoint_dir: Path, adapter_path: Optional[Path] = None, *,
                 adapters: Optional[dict[str, Path]] = None, precision: Optional[str] = None,
                 max_concurrency: int = 4, max_queue: int = 64, api_key: Optional[str] = None,
                 prompt_style: Optional[str] = None, system: Optional[str] = None,
                 quantize: Optional[str] = None) -> Service:
    """Load the model (one copy, on one device) with one adapter (adapter_path) or with named ones (adapters: NAME
    -> PATH), each with the prompt style `littune generate` would use with it."""
    import lightning as L

    from littune.inputs import RunInputs, load_for_inference
    from littune.model import check_precision, inference_precision, unwrap

    checkpoint_dir = Path(checkpoint_dir)
    if precision is not None:
        check_precision(precision)
    inputs = RunInputs(checkpoint_dir, adapter_path=adapter_path)
    precision, why = inference_precision(precision, inputs.config)
    fabric = L.Fabric(devices=1, precision=precision, accelerator="auto")
    if adapters is not None:
        models, tokenizer = load_models(fabric, inputs, adapters, prompt_style, system)
    else:
        model, tokenizer, run_dir = load_for_inference(fabric, checkpoint_dir, quantize=quantize, inputs=inputs)
        style = inputs.prompt_style(prompt_style, system, run_dir)
        model_id = checkpoint_dir.resolve().name + (f"+{run_dir.resolve().name}" if run_dir is not None else "")
        models = [Model(model_id, Served(model_id, unwrap(model)), style, tuple(style.stop_tokens(tokenizer)))]
    print(f"littune serve: precision {precision}{f' ({why})' if why else ''}", file=sys.stderr, flush=True)
    config = models[0].served.module.config
    # a sliding-window layer keeps only the window in its cache: beyond it this engine's cache would be wrong
    context = min(config.block_size, config.sliding_window_size or config.block_size)
    engine = Engine([m.served for m in models], tokenizer, max_concurrency, context)
    return Service(engine=engine, tokenizer=tokenizer, models={m.name: m for m in models},
                   named=adapters is not None, context=context, max_concurrency=max_concurrency,
                   max_queue=max_queue, api_key=api_key)


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
