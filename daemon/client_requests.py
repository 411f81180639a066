"""A client's generate request, validated: the prompt as token ids (text, ids or a chat) and its sampling fields.

Both entries take the same fields: ``/hexgen/generate/1`` as they come, the HTTP gateway after mapping
OpenAI's names onto them. Limits are checked before the tokenizer spends time on the text.
"""

from __future__ import annotations

from typing import Any

from hexgen.daemon.request_limits import MAX_TOKENS_LIMIT, SAMPLING_FIELDS, RequestError, sampling_params
from hexgen.engine.tokenizer import Tokenizer, TokenizerError

# Text longer than this per context token cannot fit; refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 64
MIN_FIT_TOKENS = 16  # a request with ``fit`` is refused when its prompt leaves less than this for the reply
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 16
OTHER_FIELDS = frozenset({"prompt", "tokens", "messages", "cert", "stop", "fit"})


def chat_tokens(messages: Any, tokenizer: Tokenizer) -> list[int]:
    """The prompt ids of a conversation under the model's chat template (a plain role-prefixed prompt for a
    model without one). Raises RequestError for a malformed conversation. O(conversation length)."""
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise RequestError(f"'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in CHAT_ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise RequestError(f"message {index} needs a role ({', '.join(CHAT_ROLES)}) and string content")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text.encode("utf-8")  # JSON can carry lone surrogates; the tokenizer takes text only
    except TokenizerError as exc:
        raise RequestError(" ".join(str(exc).split())) from None  # a template's words, on one line
    except UnicodeEncodeError:
        raise RequestError("the messages hold a lone surrogate, which is not text") from None
    # A template that writes the BOS itself must not get a second one from the encoder.
    writes_bos = bool(tokenizer.bos_token) and text.startswith(str(tokenizer.bos_token))
    return tokenizer.encode(text, add_special_tokens=not writes_bos)


def _chat_prompt(messages: Any, tokenizer: Tokenizer, max_context: int) -> list[int]:
    listed = messages if isinstance(messages, list) else []
    chars = sum(len(m["content"]) for m in listed if isinstance(m, dict) and isinstance(m.get("content"), str))
    if chars > max_context * MAX_CHARS_PER_TOKEN:
        raise RequestError(
            f"the messages hold {chars} characters, more than a context of {max_context} tokens can hold",
            code="context_full",
        )
    return chat_tokens(messages, tokenizer)


def _text_prompt(prompt: Any, tokenizer: Tokenizer, max_context: int) -> list[int]:
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string")
    try:
        prompt.encode("utf-8")  # JSON can carry lone surrogates; the tokenizer takes text only
    except UnicodeEncodeError:
        raise RequestError("'prompt' holds a lone surrogate, which is not text") from None
    if len(prompt) > max_context * MAX_CHARS_PER_TOKEN:
        raise RequestError(
            f"'prompt' has {len(prompt)} characters, more than a context of {max_context} tokens can hold"
        )
    return tokenizer.encode(prompt)


def _prompt_ids(request: dict[Any, Any], tokenizer: Tokenizer, max_context: int) -> list[int]:
    """The prompt of ``request`` (exactly one of text, ids and chat) as token ids of the model's vocabulary."""
    prompt, tokens, messages = request.get("prompt"), request.get("tokens"), request.get("messages")
    if sum(x is not None for x in (prompt, tokens, messages)) != 1:
        raise RequestError("give exactly one of 'prompt' (text), 'tokens' (ids) and 'messages' (a chat)")
    if messages is not None:
        tokens = _chat_prompt(messages, tokenizer, max_context)
    elif prompt is not None:
        tokens = _text_prompt(prompt, tokenizer, max_context)
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    ):
        raise RequestError("'tokens' must be a non-empty list of token ids")
    if any(t < 0 or t >= tokenizer.vocab_size for t in tokens):
        raise RequestError(f"token ids must lie in [0, {tokenizer.vocab_size})")
    return tokens


def parse_request(request: Any, tokenizer: Tokenizer, max_context: int) -> tuple[list[int], dict[str, Any]]:
    """Validate a generate request (exactly one of ``prompt`` text, ``tokens`` ids or chat ``messages``);
    returns (prompt token ids, sampling fields). Raises RequestError."""
    if not isinstance(request, dict):
        raise RequestError("a generate request is a map")
    tokens = _prompt_ids(request, tokenizer, max_context)
    sampling = {k: v for k, v in request.items() if k in SAMPLING_FIELDS}
    unknown = set(request) - SAMPLING_FIELDS - OTHER_FIELDS
    if unknown:
        names = sorted(k[:40] if isinstance(k, str) and k.isprintable() else repr(k)[:40] for k in unknown)
        raise RequestError(f"unknown fields: {', '.join(names)}")
    fit = request.get("fit", False)
    if not isinstance(fit, bool):
        raise RequestError("'fit' must be true or false")
    if fit:
        sampling["max_tokens"] = _fitted_max_tokens(len(tokens), sampling.get("max_tokens"), max_context)
    sampling.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    sampling["stop_token_ids"] = sampling.get("stop_token_ids") or []  # nil (or empty) means none
    sampling_params(sampling)  # the checks every replica makes (types a worker can use, max_tokens within the limit)
    if len(tokens) + sampling["max_tokens"] > max_context:
        raise RequestError(
            f"prompt ({len(tokens)} tokens) plus max_tokens ({sampling['max_tokens']}) exceeds the model's "
            f"context of {max_context}",
            code="context_full",
        )
    sampling["stop_token_ids"] = list(sampling["stop_token_ids"])
    return tokens, sampling


def _fitted_max_tokens(prompt_tokens: int, asked: Any, max_context: int) -> Any:
    """With ``fit``: the asked max_tokens (all that fits when absent) capped by the context the prompt leaves,
    refused (``context_full``) when fewer than MIN_FIT_TOKENS (or the asked count) remain."""
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        return asked  # refused by the usual checks, with their message
    wanted = MAX_TOKENS_LIMIT if asked is None else asked
    left = max_context - prompt_tokens
    if left < min(MIN_FIT_TOKENS, wanted):
        raise RequestError(
            f"the prompt ({prompt_tokens} tokens) leaves {max(left, 0)} of the model's context of {max_context} "
            "tokens for a reply",
            code="context_full",
        )
    return min(wanted, left)
