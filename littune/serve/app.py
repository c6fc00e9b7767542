"""The HTTP side of `littune serve`: OpenAI's routes over a Service, Server-Sent Events, the API key, Host checks.

Web pages cannot drive the server (the class of Ollama's CVE-2024-28224: a page can POST text/plain or a form to any
site without asking, and with DNS rebinding its own name resolves to 127.0.0.1): request bodies must come with
`Content-Type: application/json` (else 415, and a browser asks the server before sending that cross-site, which this
server never allows); on a loopback --host, a request whose Host header is not localhost, 127.x.x.x or [::1] (any
port) or a name given with --allowed_hosts (e.g. a reverse proxy's) gets 403; on another --host the Host header is
checked only when --allowed_hosts is given.

Limits, so that no request holds up the others: a body over 16 MB gets 413; a request that finds
--max_concurrency running and --max_queue waiting gets 429 before its body is parsed; a body is parsed, its messages
rendered and its prompt tokenised on a worker thread (the event loop goes on answering meanwhile).

FastAPI and uvicorn are imported only when the app is built (`littune[serve]` is an optional extra).
"""

import asyncio
import ipaddress
import re
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Optional

from littune.common import UserError
from littune.serve.engine import End, Failed, Job, Text
from littune.serve.protocol import (ApiError, chunk, completion_body, failure_error, prepare_request, usage_chunk)

MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before it is read into memory
RETRY_AFTER_S = 1


class Gone:
    """The event a request's queue gets when its client has disconnected."""


def build_app(service):
    """The FastAPI application: OpenAI's routes over `service`; the engine thread runs while the app does."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="littune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(HostCheck, service=service)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    return app


@asynccontextmanager
async def lifespan(app):
    service = app.state.service
    service.engine.start()
    auth = "API key required" if service.api_key else "no API key"
    print(f"littune serve: {', '.join(service.models)} ready {('on ' + service.url + ' ') if service.url else ''}"
          f"({service.context}-token context, up to {service.max_concurrency} requests at once, "
          f"{service.max_queue} waiting, {auth})", file=sys.stderr, flush=True)
    yield
    await asyncio.to_thread(service.engine.stop)


# ------------------------------------------------------------------------------------------------------- errors


def json_response(body: dict, status: int = 200, headers: Optional[dict] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def error_response(error: ApiError):
    return json_response(error.body(), error.status, error.headers)


async def api_error(request, error: ApiError):
    return error_response(error)


async def http_error(request, error):  # 404, 405: OpenAI's error body instead of FastAPI's {"detail"}
    return error_response(ApiError(error.status_code, f"{error.detail}: {request.method} {request.url.path}"))


async def unexpected_error(request, error):  # a bug: the client gets an error body, the log a traceback
    return error_response(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error"))


# ---------------------------------------------------------------------------------------------- routes, checks


async def health(request):
    # no key needed (load balancers probe it), so it names nothing: the model's name is behind the key
    engine = request.app.state.service.engine
    return json_response({"status": "ok", "running": len(engine.rows), "waiting": engine.waiting})


async def models(request):
    service = request.app.state.service
    authorize(service, request)
    return json_response({"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                                     "owned_by": "littune"} for name in service.models]})


async def chat_completions(request):
    return await answer(request, "chat")


async def completions(request):
    return await answer(request, "text")


def authorize(service, request) -> None:
    if service.api_key is None:
        return
    import hmac

    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.api_key.encode()):
        raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_json(request) -> None:
    """JSON only: a web page can send text/plain or a form to another site without asking, not application/json."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                            f"{media_type or 'no Content-Type'}", code="unsupported_media_type")


async def read_body(request) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MB")
    chunks, total = [], 0
    async for piece in request.stream():
        total += len(piece)
        if total > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MB")
        chunks.append(piece)
    return b"".join(chunks)


@dataclass(eq=False)
class Place:
    """A request's place among the --max_concurrency running and --max_queue waiting: taken when its body has been
    read, released exactly once, whichever way the request ends (which also drops its row from the batch)."""

    service: Any
    job: Optional[Job] = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.service.in_flight -= 1
            if self.job is not None:
                self.job.cancelled = True


def take_place(service) -> Place:
    """The queue is checked before anything that costs time: a request that cannot get a place costs nothing more."""
    if service.in_flight >= service.max_concurrency + service.max_queue:
        raise ApiError(429, f"the server is busy ({service.max_concurrency} requests running, "
                            f"{service.max_queue} waiting); retry later", kind="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    service.in_flight += 1
    return Place(service)


async def answer(request, kind: str):
    """A /v1/chat/completions ("chat") or /v1/completions ("text") request: checked, queued, answered."""
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    service = request.app.state.service
    authorize(service, request)
    require_json(request)
    raw = await read_body(request)  # no place taken yet: a client that sends its body slowly holds none
    place = take_place(service)
    try:
        # parsing, rendering and tokenising take time in proportion to the request: on a worker thread, so the
        # event loop goes on answering everyone else (/health included) meanwhile
        prepared = await run_in_threadpool(prepare_request, service, raw, kind)
    except BaseException:
        place.release()
        raise
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    place.job = Job(prompt=prepared.prompt, stop_tokens=prepared.stop_tokens, served=prepared.model.served,
                    emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event), **prepared.settings)
    watcher = asyncio.create_task(watch_disconnect(request, place, events))
    service.engine.submit(place.job)
    meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": prepared.model.name}
    if prepared.stream:
        return StreamingResponse(sse_events(events, meta, kind, prepared.include_usage, place, watcher),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await whole_answer(events, meta, kind)
    finally:
        place.release()
        watcher.cancel()


async def watch_disconnect(request, place: Place, events: asyncio.Queue) -> None:
    # the body has been read: the next ASGI message is the disconnect (or the end of the response)
    while (await request.receive())["type"] != "http.disconnect":
        pass
    place.release()
    events.put_nowait(Gone())


async def whole_answer(events: asyncio.Queue, meta: dict, kind: str):
    """The answer as one JSON body, once the engine has generated all of it."""
    pieces = []
    while True:
        event = await events.get()
        if isinstance(event, Text):
            pieces.append(event.piece)
        elif isinstance(event, End):
            return json_response(completion_body(meta, kind, "".join(pieces), event.reason, event.prompt_tokens,
                                                 event.completion_tokens))
        elif isinstance(event, Failed):
            return error_response(failure_error(event))
        else:  # the client has gone: nobody reads this
            return error_response(ApiError(499, "client closed the request"))


async def sse_events(events: asyncio.Queue, meta: dict, kind: str, include_usage: bool, place: Place, watcher):
    """The answer as Server-Sent Events in OpenAI's chunk format, as the engine generates it."""
    import json

    try:
        if kind == "chat":
            yield chunk(meta, kind, None, first=True)
        while True:
            event = await events.get()
            if isinstance(event, Text):
                yield chunk(meta, kind, event.piece)
                continue
            if isinstance(event, End):
                yield chunk(meta, kind, None, reason=event.reason)
                if include_usage:
                    yield usage_chunk(meta, kind, event.prompt_tokens, event.completion_tokens)
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(failure_error(event).body())}\n\n"
            else:  # the client has gone
                return
            yield "data: [DONE]\n\n"
            return
    finally:  # also when the response is cancelled because the client disconnected
        place.release()
        watcher.cancel()


# --------------------------------------------------------------------------------------------------- Host checks


class HostCheck:
    """Every route: a web page whose name resolves to this machine (DNS rebinding) names itself in Host."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
            allowed = self.service.allowed_hosts
            if not host_allowed(host, allowed):
                refusal = ApiError(403, host_refusal(host, allowed), code="host_not_allowed")
                await error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
        if not (is_ip(name) or re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name)):
            raise UserError(f"--allowed_hosts: {item.strip()!r} is not a host name; give names such as "
                            f"proxy.example.com or addresses, comma-separated, without a port")
        names.add(name)
    return frozenset(names)


def is_ip(name: str) -> bool:
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
