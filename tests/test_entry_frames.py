"""The entry's side of ``/hexgen/generate/1`` (``generate_protocol.serve_generate`` over a real ``Router``): the
tokens of a hop that arrived together go to the client in one write, the client reads the same frames."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from hexgen.daemon.deployment import Deployment, Replica
from hexgen.daemon.generate_protocol import GenerateDone, GenerateToken, reply_from_wire
from hexgen.daemon.hop import HopEvent, HopRequest, HopToken
from hexgen.daemon.router import Router
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import FrameReader, write_frame
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.memory_streams import Pipe

WAIT_S = 10
pytestmark = pytest.mark.trio


class PacedRouter(Router):
    """A Router over a one-replica plan whose hop's events are whatever the test puts on ``events``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        supervisor = Supervisor("me", "model")
        replica = Replica(0, 0, "colocated", ((0, 5, 1),), 0, (("me", 0),))
        supervisor.deployment = Deployment(1, 1, (replica,), ((0, 1.0),), {}, ("127.0.0.1", 1), (("127.0.0.1", 1),))
        super().__init__(None, "me", supervisor, tokenizer, 512, lambda peer, cert: True)  # type: ignore[arg-type]
        self.events, self.receive = trio.open_memory_channel[HopEvent](16)

    @contextlib.asynccontextmanager
    async def open_replica(self, peer: str, request: HopRequest, involved: Any = ()) -> AsyncIterator[Any]:
        yield self.receive


@pytest.fixture
def tokenizer(stories_dir) -> Tokenizer:
    return Tokenizer.from_dir(stories_dir)


async def test_tokens_that_arrived_together_are_one_write(tokenizer):
    """Two tokens queued before the entry looks go out in one write, before the hop goes on; the last
    token goes out with the done frame. The client reads every token frame as before."""
    router = PacedRouter(tokenizer)
    theirs_stream, ours = trio.testing.memory_stream_pair()
    pipe, theirs = Pipe(ours, "client"), Pipe(theirs_stream)  # the client's end reads and writes frames too
    router.events.send_nowait(HopToken(400))
    router.events.send_nowait(HopToken(401))
    replies = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(router.serve_generate, pipe)
            await write_frame(theirs, {"tokens": [1, 2, 3], "max_tokens": 3})
            reader = FrameReader(theirs)
            replies = [reply_from_wire(await reader.read()) for _ in range(2)]  # sent while the hop goes on
            assert pipe.writes == 1
            router.events.send_nowait(HopToken(402, "length"))
            while not isinstance(replies[-1], GenerateDone):
                replies.append(reply_from_wire(await reader.read()))
    assert [r.token for r in replies if isinstance(r, GenerateToken)] == [400, 401, 402]
    assert "".join(r.text for r in replies if isinstance(r, GenerateToken)) + replies[-1].text == tokenizer.decode(
        [400, 401, 402]
    )
    assert replies[-1].finish_reason == "length" and replies[-1].completion_tokens == 3
    assert pipe.writes == 2
