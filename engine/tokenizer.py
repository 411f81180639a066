"""Text <-> token ids for a Hugging Face model directory: the fast tokenizer, special tokens, chat templates, streaming.

Only ``tokenizer.json`` is required. ``tokenizer_config.json`` supplies the special token strings, the
``add_bos_token``/``add_eos_token`` switches (used when tokenizer.json has no post-processor) and the chat template (``chat_template.jinja`` wins when present,
as in transformers); ``generation_config.json`` and ``config.json`` supply token ids the former lacks.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """The model directory's tokenizer files, a chat template or the ids given to the tokenizer are unusable."""


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; an empty dict when the file does not exist. Raises TokenizerError if malformed."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _token_text(value: object, name: str, path: Path) -> str | None:
    """A special token written as a string or as an AddedToken dict ``{"content": ...}``; None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, dict) else None
    if isinstance(content, str):
        return content
    raise TokenizerError(f"{path}: {name} must be a string or an object with a 'content' string, got {value!r}")


def _token_ids(value: object, name: str, path: Path) -> list[int]:
    """Token ids written as an int, a list of ints or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: {name} must be an integer or a list of integers, got {value!r}")
    return list(values)


def _chat_template(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja``, else tokenizer_config's (a string or named list)."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"cannot read {template_file}: {error}") from error
    template = tokenizer_config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    source = model_dir / "tokenizer_config.json"
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"{source}: chat_template lists {sorted(map(str, named))} but no 'default' template")
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


def _has_byte_fallback(decoder_state: dict[str, Any]) -> bool:
    """Whether a serialized decoder (possibly a Sequence of decoders) contains ByteFallback."""
    if decoder_state.get("type") == "ByteFallback":
        return True
    return any(_has_byte_fallback(d) for d in decoder_state.get("decoders") or [] if isinstance(d, dict))


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body: transformers uses it to mark assistant text."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 types it as an attribute of each instance, so not a ClassVar

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, > and & for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a Hugging Face chat template in a sandbox with the helpers templates expect.

    The environment matches transformers': immutable sandbox, ``trim_blocks`` and ``lstrip_blocks``, loop
    controls, ``{% generation %}`` blocks, a non-HTML-escaping ``tojson``, ``raise_exception`` and
    ``strftime_now``. Raises TokenizerError on a syntax error. O(len(source)).
    """
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"chat template does not compile: {error}") from error


def _message_text(content: object) -> str:
    """Message content as text: a string, or the text parts of an OpenAI-style list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def fallback_chat_prompt(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt for a model without a chat template: one ``"{role}: {content}"`` line per message.

    With ``add_generation_prompt`` the prompt ends with ``"assistant:"`` for the model to continue. Raises
    TokenizerError when a message lacks a role. O(total message length).
    """
    lines = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizerError(f"message {index} must be a mapping with a 'role' string, got {message!r}")
        lines.append(f"{message['role']}: {_message_text(message.get('content'))}\n")
    if add_generation_prompt:
        lines.append("assistant:")
    return "".join(lines)


@dataclass(eq=False)
class Tokenizer:
    """A model's tokenizer: a ``tokenizers`` fast tokenizer plus the special tokens and chat template around it.

    Build it with :meth:`from_dir`. ``eos_token_ids`` holds every id that ends generation, the
    tokenizer_config's eos token first.
    """

    backend: BackendTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    chat_template: str | None = None
    source: Path | None = None
    special_token_ids: frozenset[int] = field(init=False)
    byte_fallback_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        added = self.backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        decoder = self.backend.decoder
        byte_fallback = decoder is not None and _has_byte_fallback(json.loads(decoder.__getstate__()))
        vocab = self.backend.get_vocab(with_added_tokens=True) if byte_fallback else {}
        self.byte_fallback_ids = frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the Hugging Face model directory ``path``.

        Reads ``tokenizer.json`` (required), and when present ``tokenizer_config.json``, ``chat_template.jinja``,
        ``generation_config.json`` and ``config.json``. tokenizer_config's ``add_bos_token``/``add_eos_token``
        build the post-processor only when tokenizer.json has none; otherwise the file's own post-processor
        decides, as in transformers 5. Raises TokenizerError naming the file that is missing or malformed.
        """
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} not found: the model directory needs a fast tokenizer file")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust side raises plain Exception subclasses with the parse error
            raise TokenizerError(f"cannot load {tokenizer_file}: {error}") from error

        config_file = model_dir / "tokenizer_config.json"
        tokenizer_config = _read_json(config_file)
        tokens = {
            name: _token_text(tokenizer_config.get(f"{name}_token"), f"{name}_token", config_file)
            for name in ("bos", "eos", "pad", "unk")
        }

        def token_id(name: str) -> int | None:
            text = tokens[name]
            return None if text is None else backend.token_to_id(text)

        generation_file, model_file = model_dir / "generation_config.json", model_dir / "config.json"
        generation_config, model_config = _read_json(generation_file), _read_json(model_file)
        fallback_bos = [
            *_token_ids(generation_config.get("bos_token_id"), "bos_token_id", generation_file),
            *_token_ids(model_config.get("bos_token_id"), "bos_token_id", model_file),
        ]
        bos_token_id = token_id("bos")
        if bos_token_id is None and fallback_bos:
            bos_token_id = fallback_bos[0]
        # Chat models stop on their turn-end token (tokenizer_config) and the base eos (the configs); keep all.
        eos_candidates = [
            token_id("eos"),
            *_token_ids(generation_config.get("eos_token_id"), "eos_token_id", generation_file),
            *_token_ids(model_config.get("eos_token_id"), "eos_token_id", model_file),
        ]
        eos_token_ids = tuple(dict.fromkeys(i for i in eos_candidates if i is not None))
        if bos_token_id is not None and tokens["bos"] is None:
            tokens["bos"] = backend.id_to_token(bos_token_id)
        if eos_token_ids and tokens["eos"] is None:
            tokens["eos"] = backend.id_to_token(eos_token_ids[0])

        # transformers 5 lets tokenizer.json's post-processor win over these switches; they only decide when the
        # file has none (older conversions relied on transformers building it from them).
        has_switches = "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config
        if has_switches and backend.post_processor is None:
            add_bos = bool(tokenizer_config.get("add_bos_token")) and bos_token_id is not None
            add_eos = bool(tokenizer_config.get("add_eos_token")) and bool(eos_token_ids)
            bos, eos = tokens["bos"], tokens["eos"]
            single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
            pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
            special = [*([(bos, bos_token_id)] if add_bos else []), *([(eos, eos_token_ids[0])] if add_eos else [])]
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

        return cls(
            backend=backend,
            bos_token=tokens["bos"],
            eos_token=tokens["eos"],
            pad_token=tokens["pad"],
            unk_token=tokens["unk"],
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            pad_token_id=token_id("pad"),
            chat_template=_chat_template(model_dir, tokenizer_config),
            source=model_dir,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. a leading BOS). O(len(text))."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ``ids``; raises TokenizerError for an id outside the vocabulary. O(len(ids))."""
        return self.backend.decode(self.checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def checked_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list of Python ints (numpy and torch integers accepted); raises TokenizerError for
        non-integers or ids outside the vocabulary. O(len(ids))."""
        try:
            checked = [operator.index(i) for i in ids]
        except TypeError as error:
            raise TokenizerError(f"token ids must be integers: {error}") from None
        vocab_size = self.vocab_size
        bad = [i for i in checked if not 0 <= i < vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:8]} are outside the vocabulary of {vocab_size}")
        return checked

    @cached_property
    def _compiled_chat_template(self) -> jinja2.Template | None:
        return None if self.chat_template is None else compile_chat_template(self.chat_template)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **context: Any
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) into the prompt text the model was tuned on.

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``pad_token``,
        ``unk_token`` and any extra ``context`` (e.g. ``tools``). Without a template the model gets
        :func:`fallback_chat_prompt`. The text is not tokenized: encode it with ``add_special_tokens=False``
        when the template writes the BOS itself. Raises TokenizerError when the template fails or rejects the
        conversation (``raise_exception``).
        """
        template = self._compiled_chat_template
        if template is None:
            return fallback_chat_prompt(messages, add_generation_prompt)
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            **context,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**variables)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"chat template failed: {error}") from error
        except Exception as error:  # the template is code shipped with the model: whatever it raises is its fault
            raise TokenizerError(f"chat template failed: {type(error).__name__}: {error}") from error

    def incremental_decoder(
        self, skip_special_tokens: bool = True, context_ids: Sequence[int] = ()
    ) -> IncrementalDecoder:
        """A streaming decoder over this tokenizer; see :class:`IncrementalDecoder`."""
        return IncrementalDecoder(self, skip_special_tokens, context_ids)


@dataclass(eq=False)
class IncrementalDecoder:
    """Turns token ids, fed one at a time, into text pieces whose concatenation is the full decode.

    ``push`` returns only newly completed text and ``flush`` whatever is still held back at the end of the
    stream, so that ``"".join(pieces) + flush() == tokenizer.decode(ids, skip_special_tokens)``. Text is held
    back while it ends in a partial UTF-8 character (the decoder's "\\ufffd") and while the stream ends in a
    byte-fallback token, because a later byte token can turn the whole byte run into replacement characters.
    ``context_ids`` (e.g. the prompt) are decoded as context but not emitted, so the first generated token keeps
    its leading space; the pieces then add up to ``decode(context + ids)[len(decode(context)):]`` (provided the
    context does not end inside a multi-byte character).

    Each push decodes a window from the start of the previously emitted piece, so the cost per token is
    O(length of the last two pieces) rather than O(sequence length).
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    context_ids: Sequence[int] = ()
    _ids: list[int] = field(init=False, default_factory=list)
    _prefix_offset: int = field(init=False, default=0)
    _read_offset: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        for token_id in self.context_ids:
            self._append(token_id)
        self._read_offset = len(self._ids)

    def _append(self, token_id: int) -> bool:
        """Record ``token_id``; False when it contributes no text (a skipped special token)."""
        (token_id,) = self.tokenizer.checked_ids([token_id])
        # tokenizers drops skipped special tokens before its decoders run, so dropping them here keeps
        # byte runs and leading-space stripping exactly as in a full decode.
        if self.skip_special_tokens and token_id in self.tokenizer.special_token_ids:
            return False
        self._ids.append(token_id)
        return True

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.backend.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        if not final and self._ids[-1] in self.tokenizer.byte_fallback_ids:
            return ""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        if not final and (text.endswith(_REPLACEMENT_CHAR) or len(text) <= len(prefix)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text it completes (often "", never a partial character)."""
        if not self._append(token_id):
            return ""
        return self._advance(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Feed several token ids; returns the text they complete."""
        return "".join(self.push(token_id) for token_id in token_ids)

    def flush(self) -> str:
        """End of stream: return all text still held back, even an incomplete character's "\\ufffd"."""
        return self._advance(final=True)
