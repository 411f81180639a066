"""Sealed records: one direction of a TCP connection carrying bytes encrypted and authenticated with AES-GCM
under a key the two daemons agreed over their Noise-secured libp2p connection.

A record is a 4-byte big-endian length, then that many bytes of AES-256-GCM ciphertext with its 16-byte tag.
The nonce is the record's index (a sealed stream is used in one direction only, and a key for one stream
only), so a record dropped, repeated, reordered or altered on the way fails to open: ``SealError``, and the
stream is of no further use.
"""

from __future__ import annotations

import struct

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
TAG_BYTES = 16
MAX_RECORD = (1 << 20) + 4096  # a KV part's frame (daemon.kv_frames.PART_BYTES plus its header), sealed
READ_CHUNK = 256 * 1024
_LENGTH = struct.Struct(">I")


class SealError(Exception):
    """A record that cannot be opened (altered, out of order, from another key) or one larger than allowed."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


class SealedStream:
    """One direction of ``stream`` under ``key``: ``write`` seals a record, ``read_record`` opens the next one."""

    def __init__(self, stream: trio.abc.Stream, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes, not {len(key)}")
        self.stream = stream
        self._aead = AESGCM(key)
        self._sent = 0
        self._opened = 0
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        if not data:  # an empty record carries nothing
            return
        if len(data) + TAG_BYTES > MAX_RECORD:
            raise SealError(f"a record of {len(data)} bytes is over the limit of {MAX_RECORD - TAG_BYTES}")
        sealed = self._aead.encrypt(_nonce(self._sent), data, None)
        self._sent += 1
        await self.stream.send_all(_LENGTH.pack(len(sealed)) + sealed)

    async def read_record(self) -> bytes | None:
        """The plaintext of the next record as it was written; None at a clean end between records."""
        if not await self._fill(_LENGTH.size):
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if not TAG_BYTES <= length <= MAX_RECORD:
            raise SealError(f"a sealed record of {length} bytes: not between {TAG_BYTES} and {MAX_RECORD}")
        if not await self._fill(_LENGTH.size + length):
            raise SealError(f"the stream ended inside a sealed record of {length} bytes")
        try:
            with memoryview(self._buffer)[_LENGTH.size : _LENGTH.size + length] as sealed:
                plain = self._aead.decrypt(_nonce(self._opened), sealed, None)
        except InvalidTag:
            raise SealError(
                f"sealed record {self._opened} does not open: altered, out of order or another key"
            ) from None
        del self._buffer[: _LENGTH.size + length]
        self._opened += 1
        return plain

    async def _fill(self, needed: int) -> bool:
        """Read until the buffer holds ``needed`` bytes; False when the stream ends first with none of them."""
        while len(self._buffer) < needed:
            chunk = await self.stream.receive_some(max(READ_CHUNK, needed - len(self._buffer)))
            if not chunk:
                if self._buffer:
                    raise SealError(f"the stream ended inside a sealed record ({len(self._buffer)} bytes)")
                return False
            self._buffer += chunk
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()
