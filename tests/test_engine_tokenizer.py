"""The tokenizer against transformers on the real stories260K tokenizer: encode, decode, streaming, chat templates."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hexgen.engine.tokenizer import Tokenizer, TokenizerError, fallback_chat_prompt

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared/models/stories260K"

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "tokenizer.json").is_file(), reason=f"the stories260K fixture is not at {MODEL_DIR}"
)

TEXTS = [
    "Once upon a time",
    "",
    " leading space",
    "trailing space ",
    "Hello  world\n\nnew line\ttab",
    "héllo 日本 🙂 naïve café",
    "<s> hi </s> and <unk>",
    "Lily's dog said: \"Don't!\" (3 times) - 42% of 1,000.",
]

CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] == 'system' %}
<<SYS>>{{ message['content'] | trim }}<</SYS>>
    {% elif message['role'] == 'user' %}
[INST] {{ message['content'] }} [/INST]
    {% else %}
 {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": 'Tell me a story about <b>Lily</b> & a "dog".'},
    {"role": "assistant", "content": "Once upon a time..."},
    {"role": "user", "content": "Again, in 日本語?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def reference() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def _model_copy(tmp_path: Path, **config_changes: Any) -> Path:
    """A copy of the fixture directory whose tokenizer_config.json has ``config_changes`` applied."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(MODEL_DIR / name, model_dir / name)
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {key: value for key, value in config.items() if value is not None}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


# ---------------------------------------------------------------------------------------------- encode / decode


def test_readme_prompt_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.vocab_size == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer: Tokenizer, reference: Any, text: str) -> None:
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers_and_round_trips(tokenizer: Tokenizer, reference: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    if not text.startswith(" ") and "<" not in text:
        assert tokenizer.decode(ids) == text


def test_decode_checks_ids(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=r"\[512, -1\] are outside the vocabulary of 512"):
        tokenizer.decode([5, 512, -1])
    with pytest.raises(TokenizerError, match="token ids must be integers"):
        tokenizer.decode([5, 1.5])  # type: ignore[list-item]
    assert tokenizer.decode(torch.tensor([1, 403, 407])) == "Once upon"


def test_encode_rejects_non_text(tokenizer: Tokenizer) -> None:
    with pytest.raises(TypeError, match="encode takes a str"):
        tokenizer.encode([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- streaming


def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool = True, context: list[int] | None = None) -> list[str]:
    decoder = tokenizer.incremental_decoder(skip_special_tokens=skip, context_ids=context or ())
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_incremental_decode_equals_full_decode_on_a_long_mixed_stream(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    ids: list[int] = []
    for text in TEXTS * 6:
        ids += tokenizer.encode(text)
        ids += [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 12))]
        ids += rng.choice([[], [2], [0, 1], [3 + 0xE6, 3 + 0x97], [3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82]])
    assert len(ids) > 600
    for skip in (True, False):
        pieces = _stream(tokenizer, ids, skip)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1] if piece)


def test_incremental_decode_on_random_ids(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    byte_heavy = [*range(3, 259), 0, 1, 2, 270, 278, 410]
    for _ in range(300):
        pool = rng.choice([range(tokenizer.vocab_size), byte_heavy])
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        skip = rng.random() < 0.5
        assert "".join(_stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_incremental_decode_emits_words_as_they_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Once upon a time, there was a little girl")
    pieces = _stream(tokenizer, ids)
    assert pieces[:6] == ["", "Once", " upon", " a", " time", ","]
    assert "".join(pieces) == "Once upon a time, there was a little girl"


def test_incremental_decode_holds_back_partial_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("日本 yes", add_special_tokens=False)
    pieces = _stream(tokenizer, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "日本 yes"


def test_incremental_decode_with_prompt_context_keeps_the_leading_space(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Once upon a time,")
    completion = tokenizer.encode(" there was a girl 🙂.", add_special_tokens=False)
    text = "".join(_stream(tokenizer, completion, context=prompt))
    assert text == " there was a girl 🙂."
    full, prefix = tokenizer.decode(prompt + completion), tokenizer.decode(prompt)
    assert text == full[len(prefix) :]


def test_incremental_decode_rejects_unknown_ids(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.incremental_decoder().push(100_000)


# ---------------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path: Path, add_generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = _model_copy(tmp_path, chat_template=CHAT_TEMPLATE)
    ours = Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.startswith(
        '<s>\n<<SYS>>Be brief.<</SYS>>\n[INST] Tell me a story about <b>Lily</b> & a "dog". [/INST]\n'
    )
    assert ours.endswith("[INST] Again, in 日本語? [/INST]\n" + ("ASSISTANT:\n" if add_generation_prompt else ""))


def test_chat_template_named_list_uses_default(tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0].content }}"},
    ]
    tokenizer = Tokenizer.from_dir(_model_copy(tmp_path, chat_template=templates))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_chat_template_jinja_file_wins_over_config(tmp_path: Path) -> None:
    model_dir = _model_copy(tmp_path, chat_template="from config")
    (model_dir / "chat_template.jinja").write_text(
        "{% generation %}from file{% endgeneration %} {{ messages | tojson }}"
    )
    rendered = Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "<a> & é"}])
    assert rendered == 'from file [{"role": "user", "content": "<a> & é"}]'


def test_chat_template_errors_are_tokenizer_errors(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(_model_copy(tmp_path, chat_template=CHAT_TEMPLATE))
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="chat template does not compile"):
        Tokenizer(tokenizer.backend, chat_template="{% for m in messages %}").apply_chat_template([])
    with pytest.raises(TokenizerError, match="chat template failed"):
        Tokenizer(tokenizer.backend, chat_template="{{ 1 / 0 }}").apply_chat_template([])


def test_chat_template_sandbox_blocks_mutation(tokenizer: Tokenizer) -> None:
    sneaky = Tokenizer(tokenizer.backend, chat_template="{{ messages.append(1) }}")
    with pytest.raises(TokenizerError, match="chat template failed"):
        sneaky.apply_chat_template([{"role": "user", "content": "x"}])


def test_fallback_chat_prompt_without_a_template(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert tokenizer.chat_template is None
    assert tokenizer.apply_chat_template(messages) == "system: Be kind.\nuser: hi\nassistant:"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == "system: Be kind.\nuser: hi\n"
    with pytest.raises(TokenizerError, match="message 0 must be a mapping with a 'role'"):
        fallback_chat_prompt([{"content": "no role"}])


# ---------------------------------------------------------------------------------------------- configuration


def test_add_bos_and_eos_switches_defer_to_the_post_processor_like_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = _model_copy(tmp_path, add_bos_token=False, add_eos_token=True)
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    ours = Tokenizer.from_dir(model_dir)
    for text in TEXTS[:3]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.encode("Once upon a time") == [1, 403, 407, 261, 378]


def test_add_bos_and_eos_switches_build_a_missing_post_processor(tmp_path: Path) -> None:
    model_dir = _model_copy(tmp_path, add_bos_token=True, add_eos_token=True)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = None
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378, 2]
    assert tokenizer.encode("Once upon a time", add_special_tokens=False) == [403, 407, 261, 378]


def test_token_ids_fall_back_to_config_json(tmp_path: Path) -> None:
    model_dir = _model_copy(tmp_path, bos_token=None, eos_token={"content": "</s>", "special": True})
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = [2, 0]
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.bos_token_id == 1
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token_ids == (2, 5, 0)


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_files_name_the_file(tmp_path: Path) -> None:
    model_dir = _model_copy(tmp_path)
    (model_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"cannot read .*tokenizer_config\.json"):
        Tokenizer.from_dir(model_dir)
    (model_dir / "tokenizer_config.json").write_text("{}")
    (model_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerError, match=r"cannot load .*tokenizer\.json"):
        Tokenizer.from_dir(model_dir)
