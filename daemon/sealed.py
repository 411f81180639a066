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

from hexgen.daemon.exact_reads import receive_into

KEY_BYTES = 32
TAG_BYTES = 16
MAX_RECORD = (1 << 20) + 4096  # a KV part's frame (daemon.kv_frames.PART_BYTES plus its header), sealed
_LENGTH = struct.Struct(">I")


class SealError(Exception):
    """A record that cannot be opened (altered, out of order, from another key) or one larger than allowed."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _grown(buffer: bytearray, size: int) -> bytearray:
    """``buffer``, or a new one of ``size`` bytes where it is smaller."""
    return buffer if len(buffer) >= size else bytearray(size)


class SealedStream:
    """One direction of ``stream`` under ``key``: ``write`` seals a record, ``read_record`` opens the next one.
    A record is sealed into a buffer kept for the next, and read exactly into another (``exact_reads``): a
    KV link moves hundreds of MiB/s, and every copy or fresh buffer of a record costs as much as sealing it."""

    def __init__(self, stream: trio.abc.Stream, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes, not {len(key)}")
        self.stream = stream
        self._aead = AESGCM(key)
        self._sent = 0
        self._opened = 0
        self._writing = False
        # one buffer each, reused record after record: a fresh 512 KiB buffer costs more than sealing it
        self._record = bytearray()
        self._sealed = bytearray()
        self._plain = bytearray()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data`` as the next record and send it. One task writes at a time (BusyResourceError
        otherwise): every record is sealed into the same buffer."""
        if not data:  # an empty record carries nothing
            return
        size = len(data) + TAG_BYTES
        if size > MAX_RECORD:
            raise SealError(f"a record of {len(data)} bytes is over the limit of {MAX_RECORD - TAG_BYTES}")
        if self._writing:
            raise trio.BusyResourceError("another task is writing this sealed stream")
        self._writing = True
        try:
            self._record = _grown(self._record, _LENGTH.size + size)
            record = memoryview(self._record)[: _LENGTH.size + size]
            _LENGTH.pack_into(record, 0, size)
            self._aead.encrypt_into(_nonce(self._sent), data, None, record[_LENGTH.size :])
            self._sent += 1
            await self.stream.send_all(record)
        finally:
            self._writing = False

    async def read_record(self) -> memoryview | None:
        """The plaintext of the next record as it was written, valid until the next call (records are read
        into the same buffers); None at a clean end between records."""
        head = bytearray(_LENGTH.size)
        got = await receive_into(self.stream, memoryview(head))
        if got == 0:
            return None
        if got < len(head):
            raise SealError(f"the stream ended inside a sealed record's length ({got} bytes)")
        (length,) = _LENGTH.unpack(head)
        if not TAG_BYTES <= length <= MAX_RECORD:
            raise SealError(f"a sealed record of {length} bytes: not between {TAG_BYTES} and {MAX_RECORD}")
        self._sealed = _grown(self._sealed, length)
        sealed = memoryview(self._sealed)[:length]
        if await receive_into(self.stream, sealed) < length:
            raise SealError(f"the stream ended inside a sealed record of {length} bytes")
        self._plain = _grown(self._plain, length - TAG_BYTES)
        plain = memoryview(self._plain)[: length - TAG_BYTES]
        try:
            self._aead.decrypt_into(_nonce(self._opened), sealed, None, plain)
        except InvalidTag:
            raise SealError(
                f"sealed record {self._opened} does not open: altered, out of order or another key"
            ) from None
        self._opened += 1
        return plain

    async def aclose(self) -> None:
        await self.stream.aclose()
