"""Helpers of the serve tests (a module, not a test file: test files import from here, never from each other):
the key and prompts they use, waiting for a server, the official OpenAI client, an in-process server."""

import threading
import time
from contextlib import contextmanager

import httpx
import openai

KEY = "sk-test-3f1a9c"  # must never appear in the server's output
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
           "Write a haiku about the sea, please.", "Name a color."]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MAX_TOKENS = 16


def wait_healthy(base: str, process=None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"littune serve exited: {process.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def client_for(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def chat(client, content, stream=False, model="m", **kwargs):
    """(answer text, finish reason, usage) through the official client, streamed or not."""
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, **kwargs)
        return response.choices[0].message.content, response.choices[0].finish_reason, response.usage
    pieces, reason, usage = [], None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reason = choice.finish_reason or reason
    return "".join(pieces), reason, usage


@contextmanager
def in_process_server(checkpoint, adapter_path=None, **kwargs):
    """The same app served by uvicorn on a thread of this process: (base URL, the Service)."""
    from littune import serve as serve_module
    from littune.serve import app as app_module

    service = serve_module.load_service(checkpoint, adapter_path, **kwargs)
    sock = serve_module.bind_socket("127.0.0.1", 0)
    server = serve_module.make_server(app_module.build_app(service), service, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(base)
        yield base, service
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not service.engine.thread.is_alive()
