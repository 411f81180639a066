"""In-memory stand-ins for libp2p streams: a trio stream with the ``read``/``write``/``close``/``reset`` and
the ``muxed_conn.peer_id`` the daemon's protocol handlers use, counting the writes made through it."""

from __future__ import annotations

from types import SimpleNamespace

import trio


class Pipe:
    """One end of an in-memory stream; ``writes`` counts the writes made through it."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "peer") -> None:
        self.stream, self.writes = stream, 0
        self.muxed_conn = SimpleNamespace(peer_id=peer)

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        self.writes += 1
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    async def reset(self) -> None:
        await self.stream.aclose()
