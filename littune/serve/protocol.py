"""OpenAI's API as `littune serve` speaks it: request parsing and field checks, errors, response shapes.

Request fields: messages (text content; OpenAI's text parts are joined) or prompt (one string), max_tokens
(max_completion_tokens; default: the rest of the context), temperature (default 1.0, as OpenAI's API; 0 = greedy),
top_p, seed, stop (up to 4 strings of up to 256 characters), stream, stream_options.include_usage; two extensions,
named as vLLM names them: top_k and ignore_eos. Fields littune cannot honour (n > 1, penalties, logit_bias,
logprobs, echo, best_of, suffix) are refused with 400 rather than ignored; other unknown fields are ignored. usage
counts the prompt's tokens and the tokens generated, a stop token included.

Chat messages are rendered with the prompt style `littune generate` would use (the adapter run's, else the model's
chat template, else alpaca): a conversation of several turns needs a chat template. /v1/completions continues the
raw prompt text. Prompt text longer than 16 characters per token of context (4,096 for a 256-token context), or more
messages than the context has tokens, is refused with 400 before it is rendered or tokenised.
"""

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from littune.common import Check, UserError, first_line, json_type
from littune.prepared import encode
from littune.serve.engine import Failed

MAX_STOP_STRINGS = 4  # as OpenAI's API
# Characters in one stop string. Each costs the engine thread work in proportion to its length at every token, and
# text that may begin one is held back from a stream (up to its length - 1 characters); real ones (end-of-turn
# markers, "\n\nUser:", "```") are a few dozen characters at most. 4 strings of 200k characters cost 41 ms a token.
MAX_STOP_CHARS = 256
# prompt text longer than this many characters per token of context cannot fit (English text averages about 4
# characters a token; long runs of spaces or repeated punctuation rarely reach 16): refused before it is tokenised
MAX_PROMPT_CHARS_PER_TOKEN = 16


# ------------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def failure_error(failed: Failed) -> ApiError:
    """The error answered for a request the engine could not complete (OpenAI's type: server_error from 500 up)."""
    kind = "server_error" if failed.status >= 500 else "invalid_request_error"
    return ApiError(failed.status, failed.message, kind=kind)


def api_type(value: Any) -> str:
    """A JSON value's type in JSON Schema's words, as OpenAI's errors say them ("an integer", "an array")."""
    return {int: "an integer", list: "an array"}.get(type(value)) or json_type(value)


def wrong_type(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"'{name}' must be {expected}, got {api_type(value)}", param=name, code="invalid_type")


# ------------------------------------------------------------------------------------------------------- fields


def number_field(body: dict, name: str, check: Check, default: Optional[float]) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong_type(name, "a number", value)
    if not check.allows(value):
        raise ApiError(400, f"'{name}' must be {check.describe()}, got {value}", param=name, code="invalid_value")
    return float(value)


def integer_field(body: dict, name: str, check: Check, default: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(name, "an integer", value)
    if not check.allows(value):
        raise ApiError(400, f"'{name}' must be {check.describe()}, got {value}", param=name, code="invalid_value")
    return value


def bool_field(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise wrong_type(name, "a boolean", value)
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
    stop = stop_strings(body)
    unsupported(body, "n", lambda v: v == 1 and not isinstance(v, bool), "one answer per request: n = 1")
    for name in ("presence_penalty", "frequency_penalty"):
        unsupported(body, name, lambda v: v == 0 and not isinstance(v, bool), "only 0")
    unsupported(body, "logit_bias", lambda v: v == {}, "no logit bias")
    unsupported(body, "logprobs", lambda v: v is False or v == 0, "no log probabilities")
    unsupported(body, "top_logprobs", lambda v: v == 0, "no log probabilities")
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_strings=stop,
                max_new_tokens=max_tokens if max_tokens is not None else room)


def stop_strings(body: dict) -> tuple:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return ()
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or an array of them", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop",
                       code="invalid_value")
    if max(map(len, stop), default=0) > MAX_STOP_CHARS:
        raise ApiError(400, f"a 'stop' string has at most {MAX_STOP_CHARS} characters, got one of "
                            f"{max(map(len, stop))}", param="stop", code="invalid_value")
    return tuple(stop)


def stream_fields(body: dict) -> tuple[bool, bool]:
    """(stream, include usage in a last chunk)."""
    stream = bool_field(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise wrong_type("stream_options", "an object", options)
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
    return [parse_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def parse_message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise wrong_type(where, "an object with role and content", message)
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
        raise wrong_type(f"{where}.content", "a string or an array of text parts", content)
    return {"role": role, "content": content}


def render_messages(style, messages: list[dict]) -> str:
    """The prompt text of a conversation in the served prompt style.

    A chat template renders any conversation, as `littune generate` renders one message (its default system
    message first when the request has none; a leading BOS dropped where the tokenizer adds it). A litgpt style
    (e.g. Alpaca) has a single instruction: one user message, after an optional system message (its sys_prompt),
    split at its first blank line into instruction and input, as `littune export` writes the template.
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
    # the user message as littune's chat style and the exported templates build it: instruction + "\n\n" + input
    instruction, _, input = rest[0]["content"].partition("\n\n")
    return style.apply(instruction, input=input, **({"sys_prompt": system} if system is not None else {}))


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


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also bytes that are not UTF-8, absurdly deep nesting
        raise ApiError(400, f"the request body is not valid JSON ({first_line(e)})", code="invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {api_type(body)}", code="invalid_type")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise wrong_type("model", "a string", body["model"])
    return body


def check_prompt_chars(chars: int, limit: int, context: int, param: str) -> None:
    if chars > limit:
        raise ApiError(400, f"the prompt has {chars} characters, more than the {limit} littune serve tokenises for "
                            f"this model's {context}-token context ({MAX_PROMPT_CHARS_PER_TOKEN} characters per "
                            f"token); shorten it", param=param, code="context_length_exceeded")


# ------------------------------------------------------------------------------------------- a request, prepared


@dataclass(eq=False)
class Prepared:
    """A request turned into what the engine needs."""

    model: Any  # the littune.serve.models.Model that answers (the one the `model` field names)
    prompt: torch.Tensor  # 1-D tensor of token ids on the model's device
    settings: dict  # Job keyword arguments: sampling, stop strings, max_new_tokens
    stop_tokens: tuple
    stream: bool
    include_usage: bool


def prepare_request(service, raw: bytes, kind: str) -> Prepared:
    """The body of a /v1/chat/completions ("chat") or /v1/completions ("text") request, checked, rendered and
    tokenised. Runs on a worker thread: its cost grows with the body's size. Prompt text longer than
    MAX_PROMPT_CHARS_PER_TOKEN characters per token of context is refused before it is rendered or tokenised."""
    body = parse_body(raw)
    model = service.pick(body.get("model"))
    chat = kind == "chat"
    limit = MAX_PROMPT_CHARS_PER_TOKEN * service.context
    if chat:
        messages = parse_messages(body, max_messages=service.context)
        check_prompt_chars(sum(len(m["content"]) for m in messages), limit, service.context, "messages")
        text = render_messages(model.style, messages)
        check_prompt_chars(len(text), limit, service.context, "messages")  # with the template's own text
        ignore_eos = bool_field(body, "ignore_eos")
        stop_tokens = () if ignore_eos else model.stop_tokens
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
    return Prepared(model=model, prompt=prompt, settings=settings, stop_tokens=stop_tokens, stream=stream,
                    include_usage=include_usage)


# ----------------------------------------------------------------------------------------------- response shapes


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


def usage_chunk(meta: dict, kind: str, prompt_tokens: int, completion_tokens: int) -> str:
    """The last Server-Sent Event of a stream with stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    payload = {**meta, "object": obj, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
    return f"data: {json.dumps(payload)}\n\n"
