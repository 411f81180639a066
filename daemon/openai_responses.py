"""OpenAI's response objects: a whole completion or chat completion, a streamed chunk, and the usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hexgen.daemon.completion import Completion


@dataclass(frozen=True)
class Shape:
    """OpenAI's response objects for one request: the id, time and model name all of its chunks share."""

    chat: bool
    model: str
    include_usage: bool = False  # then every chunk has a "usage" field, null but in the last one
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, text: str, done: Completion) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return self._object([choice], chunk=False) | {"usage": usage(done)}

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        """One streamed piece; a chat's first chunk also names the role, its last one carries only the reason."""
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text and not first:
                delta = {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._object([choice], chunk=True) | ({"usage": None} if self.include_usage else {})

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        return self._object([], chunk=True) | {"usage": usage(done)}

    def _object(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }


def usage(done: Completion) -> dict[str, int]:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}
