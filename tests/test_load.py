"""Load with slow clients: many clients over HTTP and libp2p at once while others open streams and never read
them, or send half an HTTP request and stall; every normal request still gets the reference tokens."""

from __future__ import annotations

import urllib.parse
from typing import Any

import httpx
import pytest
import trio

from hexgen.daemon.generate_protocol import GENERATE_PROTOCOL
from hexgen.daemon.wire import encode_frame
from hexgen.testing.chaos import ChurnConfig, ChurnSwarm, run_load
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import open_client, serving, wait_until

pytestmark = pytest.mark.trio

TEXTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park"]
MAX_TOKENS = 16
SLOW = 3  # of each kind


async def stalled_libp2p(entry: Any, prompt: list[int], held: list[int]) -> None:
    """Ask for a long answer over libp2p and never read it."""
    async with open_client() as host:
        await host.connect(entry.addr)
        stream = await host.open_stream(entry.peer_id, GENERATE_PROTOCOL)
        await stream.write(encode_frame({"tokens": prompt, "max_tokens": 400}))
        held.append(1)
        await trio.sleep_forever()


async def stalled_http_stream(url: str, held: list[int]) -> None:
    """Start a streamed completion and never read the body."""
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        body = {"prompt": TEXTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body):
            held.append(1)
            await trio.sleep_forever()


async def half_request(url: str, held: list[int]) -> None:
    """Send the start of an HTTP request and stall (a slowloris)."""
    parts = urllib.parse.urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        held.append(1)
        await trio.sleep_forever()


@pytest.mark.timeout(300)
async def test_slow_clients_do_not_stall_the_others(tmp_path, stories_dir):
    prompts = random_prompts(12, 512, seed=3, low=3, high=20)
    reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
    swarm = ChurnSwarm(tmp_path, stories_dir, ChurnConfig(daemons=3, entry_http=True, max_tokens=MAX_TOKENS))
    try:
        await swarm.start_all()
        ids = {d.peer_id for d in swarm.live()}
        async with open_client() as client:
            await wait_until(client, swarm.live(), serving(ids), timeout=180, what="serving")
            entry, held = swarm.entry, []
            assert entry.http is not None
            async with trio.open_nursery() as slow:
                for i in range(SLOW):
                    slow.start_soon(stalled_libp2p, entry, prompts[i], held)
                    slow.start_soon(stalled_http_stream, entry.http, held)
                    slow.start_soon(half_request, entry.http, held)
                with trio.fail_after(30):
                    while len(held) < 3 * SLOW:
                        await trio.sleep(0.05)
                result = await run_load(
                    swarm, client, prompts, reference, TEXTS, clients=24, duration_s=8.0, max_tokens=MAX_TOKENS
                )
                slow.cancel_scope.cancel()
        summary = result.summary()
        print(summary)
        assert not result.errors and result.mismatches == 0, result.errors[:5]
        assert len(result.latencies) >= 24, summary  # every client finished at least one request
        assert all(d.alive() for d in swarm.live())
    finally:
        await swarm.close()
