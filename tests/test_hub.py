"""Models named by a Hub id (``org/name[@revision]``), fetched from a stand-in for the Hub on loopback into a
Hub cache under tmp_path: the first download, a resumed one, the cache offline and with the Hub unreachable,
gated models, bad ids, the revision the CLI was given, and the fingerprint that keeps a swarm on one revision."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from hexgen.engine.hub import HubError, HubId, hub_id_of, local_model, model_name, parse_hub_id
from hexgen.testing.cli import run_main
from hexgen.testing.hub_server import FakeHub, FakeRepo, files_of

STORIES = "hexgen-test/stories260K"
GATED = "hexgen-test/gated"
GRANTED = "hf_granted_token"
SERVED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
CLUSTER = '[[hosts]]\nname = "a"\ngpu = "A100"\ncount = 2\n'
TRACE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0000000,30,20\n"


def _with(files: dict[str, bytes], name: str, **changes: object) -> dict[str, bytes]:
    """``files`` with the JSON file ``name`` changed."""
    return files | {name: json.dumps(json.loads(files[name]) | changes).encode()}


@pytest.fixture
def hub(stories_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Hub on loopback serving stories260K as ``STORIES`` (main; ``deep``: 8 layers in config.json;
    ``chat``: another tokenizer_config.json) and as the gated ``GATED``; the process's Hub settings point
    at it and at an empty cache."""
    files = files_of(stories_dir)
    stories = FakeRepo()
    stories.add("main", files | {"pytorch_model.bin": b"a pickle", "original/model.safetensors": b"not this"})
    stories.add("deep", _with(files, "config.json", num_hidden_layers=8))
    stories.add("chat", _with(files, "tokenizer_config.json", chat_template="{{ messages }}"))
    gated = FakeRepo(tokens=frozenset({GRANTED}))
    gated.add("main", files)
    with FakeHub({STORIES: stories, GATED: gated}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _commit(hub: FakeHub, repo: str, ref: str) -> str:
    return hub.repos[repo].refs[ref]


def _fetched(hub: FakeHub) -> list[str]:
    return sorted(seen.path.rsplit("/", 1)[-1] for seen in hub.files())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", HubId("meta-llama/Llama-3.1-8B-Instruct")),
        ("Qwen/Qwen2.5-0.5B-Instruct@main", HubId("Qwen/Qwen2.5-0.5B-Instruct", "main")),
        ("org/name@refs/pr/12", HubId("org/name", "refs/pr/12")),
        (
            "org/name_1@0123456789abcdef0123456789abcdef01234567",
            HubId("org/name_1", "0123456789abcdef0123456789abcdef01234567"),
        ),
    ],
)
def test_hub_ids_parse(text: str, expected: HubId) -> None:
    assert parse_hub_id(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("../x@", "neither a local directory nor a Hub id"),
        ("org/na me", "neither a local directory nor a Hub id"),
        ("org/name!", "neither a local directory nor a Hub id"),
        ("org//name", "neither a local directory nor a Hub id"),
        ("a/b/c", "neither a local directory nor a Hub id"),
        ("org/-name", "neither a local directory nor a Hub id"),
        ("org/na--me", "neither a local directory nor a Hub id"),
        ("org/name.git", "neither a local directory nor a Hub id"),
        ("org/" + "n" * 97, "neither a local directory nor a Hub id"),
        ("org/name@", "is not a revision"),
        ("org/name@a..b", "is not a revision"),
        ("org/name@br anch", "is not a revision"),
    ],
)
def test_malformed_hub_ids_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(HubError, match=re.escape(fragment)):
        hub_id_of(text)


def test_local_paths_and_presets_are_not_hub_ids(stories_dir: Path) -> None:
    assert hub_id_of(str(stories_dir)) is None
    assert hub_id_of("llama-2-7b") is None
    assert local_model("llama-2-7b") == "llama-2-7b"
    assert hub_id_of("org/name") == HubId("org/name")


def test_download_into_an_empty_cache_then_load_and_generate_like_transformers(hub, stories_dir, capfd) -> None:
    from hexgen.engine.llm import LLM
    from hexgen.engine.sequence import SamplingParams
    from hexgen.testing.checkpoints import reference_greedy

    path = Path(local_model(STORIES))
    assert path.name == _commit(hub, STORIES, "main") and path.parent.parent.name == "models--hexgen-test--stories260K"
    assert sorted(p.name for p in path.iterdir()) == SERVED
    assert all((path / name).read_bytes() == (stories_dir / name).read_bytes() for name in SERVED)
    assert _fetched(hub) == SERVED  # never the .bin pickle, the tokenizer.model, the README or a subfolder
    assert "Fetching" in capfd.readouterr().err  # huggingface_hub's progress bar

    llm = LLM(STORIES)  # the engine takes the Hub id, from the cache this time
    assert _fetched(hub) == SERVED
    prompt = llm.encode("Once upon a time")
    (ours,) = llm.generate([prompt], SamplingParams(max_tokens=30))
    assert [ours.token_ids] == reference_greedy(path, [prompt], 30)


def test_a_download_cut_halfway_resumes_where_it_stopped(hub, stories_dir, monkeypatch) -> None:
    from huggingface_hub import constants

    # huggingface_hub counts progress in chunks of this size: smaller than the cut, so some bytes are kept
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.cut_once.add("model.safetensors")
    path = Path(local_model(STORIES))
    weights = (stories_dir / "model.safetensors").read_bytes()
    assert (path / "model.safetensors").read_bytes() == weights
    gets = [seen for seen in hub.files() if seen.path.endswith("/model.safetensors")]
    assert [seen.range is None for seen in gets] == [True, False]
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", gets[1].range or "")[1])
    assert 0 < resumed_at <= len(weights) // 2


def test_offline_serves_from_the_cache_without_asking_the_hub(hub, monkeypatch) -> None:
    from hexgen.cli.node import plan_model

    path = local_model(STORIES)
    plan_model(f"{STORIES}@chat")  # only chat's config.json is in the cache
    asked = len(hub.seen)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_model(STORIES) == path
    assert len(hub.seen) == asked
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set and the Hub cache .* does not hold .*@deep"):
        local_model(f"{STORIES}@deep")
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set and the Hub cache .* holds only part of .*@chat"):
        local_model(f"{STORIES}@chat")
    assert len(hub.seen) == asked


def test_an_unreachable_hub_serves_the_cache_or_says_why_not(hub, monkeypatch) -> None:
    path = local_model(STORIES)
    down = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", down)
    assert local_model(STORIES) == path
    with pytest.raises(HubError, match=rf"cannot reach {down} \(ConnectError: .*\) and the Hub cache .* does not hold"):
        local_model(f"{STORIES}@deep")


def test_a_gated_model_needs_a_token_with_access(hub, monkeypatch, stories_dir) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(HubError, match=r"is gated and your Hugging Face token has no access to it: accept its terms"):
        local_model(GATED)
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    path = Path(local_model(GATED))
    assert (path / "model.safetensors").read_bytes() == (stories_dir / "model.safetensors").read_bytes()
    assert {seen.authorization for seen in hub.files("HEAD")} == {"Bearer hf_someone_else", f"Bearer {GRANTED}"}
    assert {seen.authorization for seen in hub.files()} == {f"Bearer {GRANTED}"}


def test_a_gated_model_without_a_token_says_how_to_give_one(hub) -> None:
    from huggingface_hub import get_token

    if get_token() is not None:
        pytest.skip("this machine has a Hugging Face token stored (hf auth login), so no request goes without one")
    with pytest.raises(HubError, match=r"hexgen-test/gated is gated: accept its terms at .*set HF_TOKEN or run"):
        local_model(GATED)


def test_unknown_models_and_revisions(hub) -> None:
    with pytest.raises(HubError, match=r"hexgen-test/absent is not a local directory, and .* has no model"):
        local_model("hexgen-test/absent")
    with pytest.raises(HubError, match=r"hexgen-test/stories260K has no revision 'v9'"):
        local_model(f"{STORIES}@v9")


@pytest.mark.parametrize(
    ("command", "model", "fragment"),
    [
        ("plan", "../x@", "neither a local directory nor a Hub id"),
        ("plan", "org/na me", "neither a local directory nor a Hub id"),
        ("plan", f"{STORIES}@v9", "has no revision 'v9'"),
        ("join", "../x@", "neither a local directory nor a Hub id"),
        ("join", f"{STORIES}@v9", "has no revision 'v9'"),
        ("demo", "org/name@", "is not a revision"),
    ],
)
def test_the_cli_refuses_bad_models_in_one_line(hub, tmp_path, capsys, command, model, fragment) -> None:
    from hexgen.testing.cli import assert_one_line_error

    head = {"plan": ["plan", tmp_path / "c.toml"], "join": ["join", "--key-file", tmp_path / "k"], "demo": ["demo"]}
    (tmp_path / "c.toml").write_text(CLUSTER)
    status, out, err = run_main(capsys, *head[command], "--model", model)
    assert_one_line_error(status, out, err, fragment)


def test_plan_and_join_use_the_revision_named(hub, tmp_path, capsys) -> None:
    from hexgen.cli.join import join_options, layered_args
    from hexgen.cli.node import build_parser

    (tmp_path / "c.toml").write_text(CLUSTER)
    (tmp_path / "trace.csv").write_text(TRACE)
    for revision, layers in (("deep", 8), ("main", 5)):
        model = f"{STORIES}@{revision}"
        status, out, err = run_main(
            capsys, "plan", tmp_path / "c.toml", "--model", model, "--trace", tmp_path / "trace.csv", "--json"
        )
        assert status == 0, err
        report = json.loads(out)
        assert report["model"] == model
        assert max(stage["layers"][1] for g in report["groups"] for stage in g["stages"]) == layers
    commit = _commit(hub, STORIES, "chat")
    argv = ["join", "--model", f"{STORIES}@{commit}", "--simulate-gpu", "A100", "--key-file", str(tmp_path / "k")]
    args = build_parser().parse_args(argv)
    layered_args(args)
    model_dir = Path(join_options(args).node.model)
    assert model_dir.name == commit and "chat_template" in (model_dir / "tokenizer_config.json").read_text()


def test_the_fingerprint_tells_revisions_apart_and_not_copies(hub, stories_dir) -> None:
    from hexgen.daemon.model_files import model_fingerprint

    main, chat = local_model(STORIES), local_model(f"{STORIES}@chat")
    assert model_fingerprint(main) == model_fingerprint(stories_dir)
    assert model_fingerprint(chat) != model_fingerprint(main)


def test_node_settings_take_a_model_from_disk_only(stories_dir) -> None:
    from hexgen.daemon.config import ConfigError, NodeConfig

    assert NodeConfig(model=str(stories_dir)).model == str(stories_dir)
    with pytest.raises(ConfigError, match=r"model org/name: is a Hub id: resolve it to its snapshot directory"):
        NodeConfig(model="org/name")
    with pytest.raises(ConfigError, match=r"model /no/such/dir: is neither a directory, a preset nor a Hub id"):
        NodeConfig(model="/no/such/dir")
    with pytest.raises(ConfigError, match=r"model must name a checkpoint directory or a preset"):
        NodeConfig(model=" ")


def test_a_snapshot_is_called_by_its_hub_name():
    assert model_name("/cache/hub/models--org--na.me/snapshots/0123abcd") == "org/na.me"
    assert model_name("/models/stories260K") == "stories260K"
    assert model_name("llama-2-7b") == "llama-2-7b"
    assert model_name("/cache/models--broken/snapshots/0123") == "0123"
