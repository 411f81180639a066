"""``hexgen-client generate`` as a subprocess against a real daemon serving stories260K."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from hexgen.daemon.connectivity import UNKNOWN_PEER_SYNC_AFTER_S
from hexgen.daemon.generate_protocol import GenerateDone, replies
from hexgen.daemon.host import new_identity, open_host
from hexgen.testing.checkpoints import reference_greedy
from hexgen.testing.daemon_harness import Swarm, open_client, serving, wait_until

PROMPT = "Once upon a time"
PROMPT_IDS = [1, 403, 407, 261, 378]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, stories_dir):
    swarm = Swarm(tmp_path_factory.mktemp("client"), model=str(stories_dir))
    try:
        d = swarm.start("n0", gpu="A100")

        async def ready() -> None:
            async with open_client() as client:
                await wait_until(client, [d], serving({d.peer_id}), timeout=120, what="serving")

        trio.run(ready)
        yield d
    finally:
        swarm.close()


def client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hexgen.cli.client", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_generate_streams_the_reference_text(daemon, stories_dir):
    (expected,) = reference_greedy(stories_dir, [PROMPT_IDS], 30)
    as_json = client("generate", PROMPT, "--max-tokens", "30", "--peer", daemon.addr, "--json")
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["tokens"] == expected and result["completion_tokens"] == 30
    assert result["prompt_tokens"] == len(PROMPT_IDS) and result["ttft_ms"] > 0
    assert result["served_by"] and result["served_by"][0]["role"] == "colocated"
    plain = client("generate", PROMPT, "--max-tokens", "30", env={"HEXGEN_PEER": daemon.addr})
    assert plain.returncode == 0 and plain.stdout == result["text"] + "\n"
    assert "there was a little girl" in plain.stdout


def test_stop_strings_end_the_text_before_them(daemon):
    full = json.loads(client("generate", PROMPT, "--max-tokens", "30", "--peer", daemon.addr, "--json").stdout)
    stop = "little"
    assert stop in full["text"]
    cut = json.loads(client("generate", PROMPT, "--peer", daemon.addr, "--stop", stop, "--json").stdout)
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)]


def test_clear_errors(daemon):
    for args, message in (
        (["generate", "x"], "no swarm to ask"),
        (["generate", "x", "--peer", "/ip4/127.0.0.1/tcp/1/p2p/" + daemon.peer_id], "cannot reach"),
        (["generate", "x", "--peer", "not-a-multiaddr"], "cannot reach"),
        (["generate", "x", "--peer", daemon.addr, "--max-tokens", "0"], "max_tokens"),
        (["generate", "x", "--peer", daemon.addr, "--top-p", "7"], "top_p"),
    ):
        result = client(*args, env={"HEXGEN_PEER": ""})
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result


def chat(*args: str, lines: str, daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hexgen.cli.client", "chat", "--peer", daemon.addr, *args],
        input=lines,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_chat_keeps_the_conversation_and_equals_the_reference(daemon, stories_dir):
    from hexgen.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(stories_dir)
    conversation = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat"}]
    first_ids = tokenizer.encode(tokenizer.apply_chat_template(conversation))
    (first,) = reference_greedy(stories_dir, [first_ids], 12)
    first_text = tokenizer.decode(first)
    conversation += [{"role": "assistant", "content": first_text}, {"role": "user", "content": "and a dog"}]
    (second,) = reference_greedy(stories_dir, [tokenizer.encode(tokenizer.apply_chat_template(conversation))], 12)
    result = chat("--system", "Tell a story.", "--max-tokens", "12", lines="A cat\n\nand a dog\n", daemon=daemon)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first_text}\n{tokenizer.decode(second)}\n"


def test_chat_survives_a_refused_message_and_resets(daemon):
    too_long = "word " * 600  # beyond stories260K's context of 512
    result = chat("--max-tokens", "4", lines=f"{too_long}\n/reset\nhello\n/exit\nnot sent\n", daemon=daemon)
    assert result.returncode == 1, result.stderr  # the conversation goes on, but a message went unanswered
    assert "does not fit the model's context, even alone" in result.stderr and "Traceback" not in result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "(the conversation starts over)" and len(out) == 2


def test_chat_with_default_flags_fits_every_turn_into_a_small_context(daemon):
    """stories260K has a context of 512 tokens, and its greedy stories run on for hundreds: the first reply is
    capped by the context, and later turns drop the oldest exchange to make room."""
    result = chat(lines="A cat\nand a dog\nand a bird\n", daemon=daemon)
    assert result.returncode == 0, result.stderr
    assert "fills the model's context of 512" in result.stderr
    assert "dropped the oldest 2 messages" in result.stderr
    assert "hexgen-client:" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.count("\n") >= 3


def test_a_client_that_came_and_left_leaves_only_key_value_lines(tmp_path, stories_dir):
    """py-libp2p wrote a multi-line block to stderr for each client a daemon asked for its advert (clients
    have none); the daemon now asks members only, and every libp2p record is one key=value line."""
    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        d = swarm.start("n0")

        async def visit() -> None:
            async with open_client() as watcher:
                await wait_until(watcher, [d], serving({d.peer_id}), timeout=120, what="serving")
            async with open_client() as client:  # after the daemon's first seconds, when it greets newcomers
                await client.connect(d.addr)
                answers = [r async for r in replies(client, d.peer_id, {"prompt": PROMPT, "max_tokens": 3})]
                assert isinstance(answers[-1], GenerateDone), answers
                # the window in which a daemon asks an unknown peer for its advert (nothing to await: it
                # must not happen)
                await trio.sleep(3 * UNKNOWN_PEER_SYNC_AFTER_S)

        trio.run(visit)
        assert swarm.stop(d) == 0
        lines = d.log().splitlines()
        assert lines and [line for line in lines if not line.startswith("ts=")] == []
        assert "/hexgen/sync/1" not in d.log() and "Traceback" not in d.log()
    finally:
        swarm.close()


@pytest.mark.trio
async def test_libp2p_dials_nobody_by_itself():
    """libp2p's auto-connector would dial a client that left (its listen address came with identify) every
    few seconds for as long as the daemon runs; daemons dial the members they lost themselves."""
    async with open_host(new_identity()) as daemon:
        async with open_host(new_identity()) as client:
            await client.connect(daemon.addrs[0])
            with trio.fail_after(10):
                while daemon.speaks(client.peer_id, "/meshsub/1.1.0") is None:  # identify told the address
                    await trio.sleep(0.01)
            await client.disconnect(daemon.peer_id)  # in one process, closing the host alone goes unnoticed
        with trio.fail_after(10):
            while await daemon.disconnects.receive() != client.peer_id or client.peer_id in daemon.connected_peers():
                pass
        network = daemon.libp2p.get_network()
        dialled: list[str] = []
        real_dial = network.dial_peer

        async def dial_peer(peer_id):
            dialled.append(str(peer_id))
            return await real_dial(peer_id)

        network.dial_peer = dial_peer
        connector = network.auto_connector
        connector.clear_all_cooldowns()
        with trio.fail_after(10):
            await connector.maybe_connect()
        assert dialled == []


def test_quiet_libraries_outlasts_libp2p_s_own_logging_setup() -> None:
    """In a fresh interpreter (libp2p not yet imported, as in the demo and the client): libp2p's import sets its
    logger to WARNING and cuts it off from the root, so a level set before it was undone, and a connection torn
    down by Ctrl-C printed its traceback raw."""
    import subprocess
    import sys

    script = (
        "import logging; from hexgen.daemon.logs import quiet_libraries; quiet_libraries(); import libp2p; "
        "from libp2p.network import swarm; logger = logging.getLogger('libp2p'); "
        "print(logger.getEffectiveLevel(), logger.propagate, len(logger.handlers))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [str(50), "True", "0"], out
