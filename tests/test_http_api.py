"""The HTTP gateway of real daemons, driven by the official ``openai`` client: reference text, errors, metrics."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from hexgen.daemon.generate_protocol import GENERATE_PROTOCOL, GenerateDone, GenerateError, replies
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.checkpoints import reference_greedy
from hexgen.testing.cli import join
from hexgen.testing.daemon_harness import Daemon, Swarm, open_client, serving, wait_until

API_KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "stories260K"
MAX_TOKENS = 24
PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A dog"}]
PARTS = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "dog"}]}]
HTTP_TIMEOUT_S = 60.0
DISCONNECTS = {"name": "hexgen_client_disconnects_total", "endpoint": "/v1/completions"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Iterator[list[Daemon]]:
    """Two daemons (simulated H100 and A100) serving stories260K, each with a gateway that wants API_KEY."""
    s = Swarm(tmp_path_factory.mktemp("http"), model=str(stories_dir))
    try:
        daemons = s.start_many(2, gpus=["H100", "A100"], extra=["--http", "0", "--api-key", API_KEY])
        ids = {d.peer_id for d in daemons}
        trio.run(watch, daemons, serving(ids), "serving")
        yield daemons
    finally:
        s.close()


async def watch(daemons: list[Daemon], condition: Callable[[Any], bool], what: str) -> None:
    async with open_client() as client:
        await wait_until(client, daemons, condition, timeout=120, what=what)


@pytest.fixture(scope="module")
def expected(stories_dir: Path) -> dict[str, tuple[list[int], list[int], str]]:
    """transformers' greedy continuation of the completion prompt and of the chat prompt: (prompt ids,
    completion ids, completion text). stories260K has no chat template, so the chat is the fallback one."""
    tokenizer = Tokenizer.from_dir(stories_dir)
    assert tokenizer.chat_template is None
    prompts = {"text": tokenizer.encode(PROMPT), "chat": tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))}
    completions = reference_greedy(stories_dir, list(prompts.values()), MAX_TOKENS)
    return {
        name: (prompt, completion, tokenizer.decode(completion))
        for (name, prompt), completion in zip(prompts.items(), completions, strict=True)
    }


def client_of(daemon: Daemon, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.http}/v1", api_key=api_key, max_retries=0, timeout=HTTP_TIMEOUT_S)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_of(daemon: Daemon) -> Samples:
    """Every sample of the daemon's /metrics (parsed by prometheus_client): (name, sorted labels) -> value."""
    text = httpx.get(f"{daemon.http}/metrics", timeout=HTTP_TIMEOUT_S).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def finish_reason(completion_ids: list[int]) -> str:
    return "stop" if completion_ids[-1] == 2 and len(completion_ids) < MAX_TOKENS else "length"


def test_completions_give_the_reference_text(swarm, expected):
    prompt_ids, completion_ids, text = expected["text"]
    for daemon in swarm:
        client = client_of(daemon)
        reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].text == text
        assert reply.choices[0].finish_reason == finish_reason(completion_ids)
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), len(completion_ids))
        assert reply.usage.total_tokens == len(prompt_ids) + len(completion_ids)
    stream = client_of(swarm[1]).completions.create(
        model=MODEL,
        prompt=[PROMPT],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        user="someone",
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish_reason(completion_ids)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(completion_ids)


def test_chat_completions_give_the_reference_text(swarm, expected):
    prompt_ids, completion_ids, text = expected["chat"]
    client = client_of(swarm[0])
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == finish_reason(completion_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), len(completion_ids))
    stream = client.chat.completions.create(
        model=MODEL,
        messages=PARTS,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish_reason(completion_ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == len(completion_ids)


def raw_post(daemon: Daemon, path: str, content: bytes, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{daemon.http}{path}", content=content, headers=headers, timeout=HTTP_TIMEOUT_S)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_bad_requests_get_openai_errors_and_the_swarm_still_serves(swarm, expected):
    daemon = swarm[0]
    with pytest.raises(openai.AuthenticationError):
        client_of(daemon, "wrong-key").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert_error(raw_post(daemon, "/v1/completions", b"{}", headers={}), 401, code="invalid_api_key")
    assert httpx.get(f"{daemon.http}/status", timeout=HTTP_TIMEOUT_S).status_code == 200  # open: monitoring
    client = client_of(daemon)
    for params, param in (
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"n": 2}, "n"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**({"model": MODEL, "prompt": PROMPT, "max_tokens": 4} | params))
        assert caught.value.status_code == 400 and caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"
    assert_error(raw_post(daemon, "/v1/completions", b'{"prompt": "Once'), 400, code="invalid_json")
    assert_error(raw_post(daemon, "/v1/completions", b"[1, 2]"), 400, code="invalid_json")
    assert_error(raw_post(daemon, "/v1/completions", json.dumps({"prompt": [1, 2]}).encode()), 400, param="prompt")
    assert_error(raw_post(daemon, "/v1/completions", json.dumps({"prompt": "x", "logprobs": 3}).encode()), 400)
    assert_error(raw_post(daemon, "/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400)
    assert_error(raw_post(daemon, "/v1/completions", b" " * (2 << 20)), 413)
    assert_error(raw_post(daemon, "/v1/nothing", b"{}"), 404)
    assert_error(httpx.get(f"{daemon.http}/v1/completions", headers=AUTH, timeout=HTTP_TIMEOUT_S), 405)
    assert client.models.list().data[0].id == MODEL
    assert (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        == expected["text"][2]
    )


def metrics_when(daemon: Daemon, ready: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """The daemon's metrics once ``ready`` holds for them (polled; the last ones after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not ready(samples := metrics_of(daemon)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return samples


def counter(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def growth(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return counter(after, name, **labels) - counter(before, name, **labels)


def test_metrics_count_requests_and_status_names_peers_and_plan(swarm):
    daemon = swarm[1]
    before = metrics_of(daemon)
    client = client_of(daemon)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=9)
    after = metrics_of(daemon)

    assert growth(before, after, "hexgen_requests_total", endpoint="/v1/completions", status="200") == 2
    assert growth(before, after, "hexgen_requests_total", endpoint="/v1/completions", status="400") == 1
    invalid = {"endpoint": "/v1/completions", "type": "invalid_request_error"}
    assert growth(before, after, "hexgen_request_errors_total", **invalid) == 1
    assert growth(before, after, "hexgen_completion_tokens_total") == 10
    assert growth(before, after, "hexgen_time_to_first_token_seconds_count") == 2
    assert growth(before, after, "hexgen_time_per_output_token_seconds_count") == 2
    assert counter(after, "hexgen_requests_in_flight") == 0
    assert counter(after, "hexgen_peers") == 2
    assert counter(after, "hexgen_plan_epoch") >= 1
    roles = [dict(labels) for (name, labels), value in after.items() if name == "hexgen_role" and value == 1]
    assert roles and all(r["role"] in {"prefill", "decode", "colocated"} for r in roles)
    status = httpx.get(f"{daemon.http}/status", timeout=HTTP_TIMEOUT_S).json()
    assert {p["peer_id"] for p in status["peers"]} == {swarm[0].peer_id}
    assert status["plan"]["epoch"] == counter(after, "hexgen_plan_epoch") and status["plan"]["body"]["plan"]["groups"]


@pytest.mark.trio
async def test_libp2p_entry_is_counted_too(swarm):
    daemon = swarm[0]
    before = await trio.to_thread.run_sync(metrics_of, daemon)
    async with open_client() as client:
        await client.connect(daemon.addr)
        with trio.fail_after(HTTP_TIMEOUT_S):
            answers = [r async for r in replies(client, daemon.peer_id, {"prompt": PROMPT, "max_tokens": 3})]
            assert isinstance(answers[-1], GenerateDone), answers
            (refusal,) = [r async for r in replies(client, daemon.peer_id, {"prompt": 1})]
            assert isinstance(refusal, GenerateError)
    after = await trio.to_thread.run_sync(metrics_of, daemon)
    for status in ("200", "400"):
        assert growth(before, after, "hexgen_requests_total", endpoint=GENERATE_PROTOCOL, status=status) == 1
    assert growth(before, after, "hexgen_completion_tokens_total") == 3


@contextlib.contextmanager
def hang_up_later(daemon: Daemon, path: str, body: dict[str, Any]) -> Iterator[None]:
    """Send one POST over a raw socket and close the socket, unread, when the block ends."""
    assert daemon.http is not None
    host, port = daemon.http.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in AUTH.items()) + f"Content-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(head.encode() + data)
        yield


def test_finished_streams_are_not_disconnects(swarm):
    daemon = swarm[0]
    before = metrics_of(daemon)
    client = client_of(daemon)
    for _ in range(3):
        list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True))
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, stream=True))
    chat = "/v1/chat/completions"

    def unwound(m: Samples) -> bool:  # a request is counted once its handler has returned
        done = growth(before, m, "hexgen_requests_total", endpoint="/v1/completions", status="200")
        return done == 3 and growth(before, m, "hexgen_requests_total", endpoint=chat, status="200") == 1

    after = metrics_when(daemon, unwound)
    assert unwound(after)
    assert growth(before, after, **DISCONNECTS) == 0
    assert growth(before, after, "hexgen_client_disconnects_total", endpoint=chat) == 0


def test_clients_leaving_mid_request_free_the_work_everywhere(swarm):
    """One client closes a stream after its first chunk, another gives up waiting for a whole completion:
    each time the generation stops early, and no daemon keeps a request in flight."""
    entry = swarm[1]
    # stories260K's greedy text runs on past 400 tokens (in about 0.5 s here): only a cancel ends it early
    max_tokens = 400
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    url = f"{entry.http}/v1/completions"

    def leave_stream() -> None:
        with httpx.stream("POST", url, json=body | {"stream": True}, headers=AUTH, timeout=HTTP_TIMEOUT_S) as reply:
            assert reply.status_code == 200
            assert next(line for line in reply.iter_lines() if line.startswith("data: {"))
        # leaving the block closed the connection mid-stream

    def give_up_waiting(before: Samples) -> None:
        # a whole completion shows nothing until it ends: hang up once the entry has counted a token of it
        with hang_up_later(entry, "/v1/completions", body):
            metrics = metrics_when(entry, lambda m: growth(before, m, "hexgen_completion_tokens_total") > 0)
            assert growth(before, metrics, "hexgen_completion_tokens_total") > 0

    for leave, status in ((lambda before: leave_stream(), "200"), (give_up_waiting, "499")):
        before = metrics_of(entry)
        leave(before)
        trio.run(
            watch,
            swarm,
            lambda view: all(s is not None and s["serving"]["in_flight"] == 0 for s in view.values()),
            "every request freed",
        )
        # the entry counts the request once its handler has unwound
        after = metrics_when(entry, lambda m, before=before: growth(before, m, **DISCONNECTS) > 0)
        assert counter(after, "hexgen_requests_in_flight") == 0
        assert growth(before, after, **DISCONNECTS) == 1
        assert growth(before, after, "hexgen_requests_total", endpoint="/v1/completions", status=status) == 1
        assert 1 <= growth(before, after, "hexgen_completion_tokens_total") < max_tokens, leave.__name__
    reply = client_of(entry).completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


def test_a_daemon_without_checkpoint_serves_status_but_no_model(tmp_path):
    s = Swarm(tmp_path)  # plans for llama-2-7b, serves nothing
    try:
        daemon = s.start("solo", extra=["--http", "0"])
        assert daemon.http and daemon.http.startswith("http://127.0.0.1:")
        client = client_of(daemon)
        assert client.models.list().data == []
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="llama-2-7b", prompt=PROMPT, max_tokens=4)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "no_checkpoint"
        status = httpx.get(f"{daemon.http}/status", timeout=HTTP_TIMEOUT_S).json()
        assert status["peer_id"] == daemon.peer_id and status["serving"] is None
        assert counter(metrics_of(daemon), "hexgen_requests_total", endpoint="/status", status="200") == 1
    finally:
        s.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http", "70000"], "--http 70000: a port is 0-65535"),
        (["--http", "0", "--api-key", " "], "--api-key must not be empty"),
        (["--http", "port"], "invalid int value"),
    ],
)
def test_bad_http_flags_are_one_line_errors(tmp_path, args, message):
    status, err = join(*args, tmp_path=tmp_path)
    assert status == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1 or "usage:" in err


def test_an_http_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, err = join("--http", str(taken.getsockname()[1]), "--api-key", "k", tmp_path=tmp_path)
    assert status == 2 and "Address already in use" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("hexgen-node: error:")] == err.splitlines()
    status, err = join("--api-key", "k", tmp_path=tmp_path)
    assert status == 2 and "give --http PORT too" in err
