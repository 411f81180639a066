"""OpenAI request bodies, read and validated: the JSON object, its sampling fields in the router's terms, the
prompt or messages, the streaming flags, and the fields this server cannot honour (refused unless neutral)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from hexgen.daemon.http_errors import ApiError
from hexgen.daemon.metrics import CLIENT_GONE
from hexgen.daemon.request_limits import MAX_TOKENS_LIMIT

MAX_BODY_BYTES = 1 << 20
# Fields the engine cannot honour: accepted only with one of these neutral values.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class Job:
    """A validated generation request and how to answer it."""

    endpoint: str
    chat: bool
    tokens: list[int]
    sampling: dict[str, Any]
    stops: list[str]
    stream: bool
    include_usage: bool


def check_neutral(body: dict[str, Any]) -> None:
    for name, neutral in NEUTRAL_VALUES.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"{name!r} is not supported by this server", param=name, code="unsupported_parameter")


def number(
    body: dict[str, Any], name: str, low: float, high: float, *, integer: bool = False, open_low: bool = False
) -> Any:
    """``body[name]`` checked to be a number (an integer if asked) in [low, high] (or (low, high]); None if absent."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    allowed = (int,) if integer else (int, float)
    in_range = (
        isinstance(value, allowed)
        and not isinstance(value, bool)
        and (low < value if open_low else low <= value)
        and value <= high
    )
    if not in_range:
        bounds = f"{'(' if open_low else '['}{low}, {high}]"
        raise ApiError(400, f"{name!r} must be {kind} in {bounds}, got {value!r}", param=name)
    return value


def sampling_fields(body: dict[str, Any], max_tokens_field: str) -> dict[str, Any]:
    """The request's sampling fields in the router's terms (absent ones left out)."""
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(400, f"only one choice per request is supported ('n' 1), got {body['n']!r}", param="n")
    fields = {
        "max_tokens": number(body, max_tokens_field, 1, MAX_TOKENS_LIMIT, integer=True),
        "temperature": number(body, "temperature", 0.0, 2.0),
        "top_p": number(body, "top_p", 0.0, 1.0, open_low=True),
        "top_k": number(body, "top_k", -1, 1 << 30, integer=True),
        "seed": number(body, "seed", *SEED_RANGE, integer=True),
        "stop": body.get("stop"),
    }
    if fields["top_k"] == -1:  # vLLM's spelling of "off"
        fields["top_k"] = 0
    return {k: v for k, v in fields.items() if v is not None}


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or (usage is not None and not isinstance(usage, bool)):
        raise ApiError(400, "'stream_options' is an object with a boolean 'include_usage'", param="stream_options")
    return True, bool(usage)


def prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(
            400,
            "'prompt' must be a string (or a list holding one string): batches and token-id prompts are not supported",
            param="prompt",
        )
    return prompt


def plain_messages(body: dict[str, Any]) -> Any:
    """``messages`` with OpenAI's content parts (``[{"type": "text", "text": ...}]``) joined into strings."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return messages
    plain = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            texts = [part.get("text", "") for part in message["content"] if isinstance(part, dict)]
            if not all(isinstance(text, str) for text in texts):
                raise ApiError(400, "the 'text' of a content part must be a string", param="messages")
            message = message | {"content": "".join(texts)}
        plain.append(message)
    return plain


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, read up to MAX_BODY_BYTES (413 beyond, 400 if not a JSON object)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(CLIENT_GONE, "the client went away while sending the body") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body
