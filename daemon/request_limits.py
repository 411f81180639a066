"""What a request may ask for: the sampling fields and limits every entry and replica enforce, and the error
that refuses the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hexgen.daemon.worker_setup import INT64, SAMPLING_KINDS
from hexgen.engine.sequence import SamplingParams

MAX_TOKENS_LIMIT = 4096
SAMPLING_FIELDS = frozenset({"max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos"})


class RequestError(ValueError):
    """A client request that cannot be served as asked; the message says why, ``code`` what kind (clients
    act on some: a chat drops its oldest messages on ``context_full``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def _check_kind(name: str, kind: type, value: object) -> None:
    if kind is bool and not isinstance(value, bool):
        raise RequestError(f"{name!r} must be true or false")
    in_range = type(value) is int and INT64[0] <= value < INT64[1]
    if kind is int and not in_range:
        raise RequestError(f"{name!r} must be a 64-bit integer")
    if kind is float and not (in_range or type(value) is float):
        raise RequestError(f"{name!r} must be a number")


def sampling_params(sampling: object) -> SamplingParams:
    """The engine's sampling parameters of a request's sampling map (fields of SAMPLING_FIELDS, ``max_tokens``
    required and at most MAX_TOKENS_LIMIT, each of the type a worker takes). Raises RequestError."""
    if not isinstance(sampling, Mapping) or set(sampling) - SAMPLING_FIELDS:
        raise RequestError("replica request needs a sampling map")
    for name, kind in SAMPLING_KINDS.items():  # the worker takes these fields as they are
        if name in sampling and not (name == "seed" and sampling[name] is None):
            _check_kind(name, kind, sampling[name])
    stop_ids = sampling.get("stop_token_ids", [])  # the worker takes no nil here
    if not isinstance(stop_ids, list | tuple) or not all(type(t) is int and 0 <= t < 1 << 63 for t in stop_ids):
        raise RequestError("'stop_token_ids' must be a list of token ids")
    if "max_tokens" not in sampling:
        raise RequestError("a replica request needs 'max_tokens'")
    if sampling["max_tokens"] > MAX_TOKENS_LIMIT:
        raise RequestError(f"max_tokens is limited to {MAX_TOKENS_LIMIT}")
    fields: dict[str, Any] = dict(sampling)
    try:
        return SamplingParams(**(fields | {"stop_token_ids": tuple(stop_ids)}))
    except (ValueError, OverflowError) as exc:  # OverflowError: an int too large for a float
        raise RequestError(str(exc)) from None
