"""Sealed records: one direction of a TCP connection carrying bytes encrypted and authenticated with AES-GCM
under a key the two daemons agreed over their Noise-secured libp2p connection. ``SealedStream`` is a trio
stream's; a worker that holds a link's socket itself seals and opens with ``Sealer`` and ``Opener``.

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
LENGTH_BYTES = _LENGTH.size


class SealError(Exception):
    """A record that cannot be opened (altered, out of order, from another key) or one larger than allowed."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _grown(buffer: bytearray, size: int) -> bytearray:
    """``buffer``, or a new one of ``size`` bytes where it is smaller."""
    return buffer if len(buffer) >= size else bytearray(size)


class Sealer:
    """Seals records in order under one key, each into a buffer kept for the next: a KV link moves hundreds of
    MiB/s, and a fresh 512 KiB buffer per record costs more than sealing it."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self._sent = 0
        self._record = bytearray()

    def seal(self, data: bytes | bytearray | memoryview) -> memoryview:
        """``data`` as the next record, length prefix included; valid until the next call. O(len(data))."""
        size = len(data) + TAG_BYTES
        if size > MAX_RECORD:
            raise SealError(f"a record of {len(data)} bytes is over the limit of {MAX_RECORD - TAG_BYTES}")
        self._record = _grown(self._record, _LENGTH.size + size)
        record = memoryview(self._record)[: _LENGTH.size + size]
        _LENGTH.pack_into(record, 0, size)
        self._aead.encrypt_into(_nonce(self._sent), data, None, record[_LENGTH.size :])
        self._sent += 1
        return record


class Opener:
    """Opens the records a ``Sealer`` under the same key sealed, in order, into a buffer kept for the next."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self._opened = 0
        self._plain = bytearray()
        self._sealed = bytearray()

    @staticmethod
    def length(head: bytes | bytearray) -> int:
        """The sealed length a record's prefix gives; SealError when out of bounds."""
        (length,) = _LENGTH.unpack(head)
        if not TAG_BYTES <= length <= MAX_RECORD:
            raise SealError(f"a sealed record of {length} bytes: not between {TAG_BYTES} and {MAX_RECORD}")
        return int(length)

    def sealed_buffer(self, length: int) -> memoryview:
        """Where to read a record's ``length`` sealed bytes: a buffer kept for the next record."""
        self._sealed = _grown(self._sealed, length)
        return memoryview(self._sealed)[:length]

    def open(self, sealed: memoryview) -> memoryview:
        """The plaintext of the next record, valid until the next call; SealError when it does not open."""
        self._plain = _grown(self._plain, len(sealed) - TAG_BYTES)
        plain = memoryview(self._plain)[: len(sealed) - TAG_BYTES]
        self.open_into(sealed, plain)
        return plain

    def open_into(self, sealed: memoryview, plain: memoryview) -> None:
        """Open the next record into ``plain``, which holds exactly its plaintext's bytes (where they belong,
        with no copy after); SealError when it does not open, and then ``plain`` holds nothing to trust."""
        if len(plain) != len(sealed) - TAG_BYTES:
            raise SealError(f"a sealed record of {len(sealed)} bytes does not open into {len(plain)}")
        try:
            self._aead.decrypt_into(_nonce(self._opened), sealed, None, plain)
        except InvalidTag:
            raise SealError(
                f"sealed record {self._opened} does not open: altered, out of order or another key"
            ) from None
        self._opened += 1


class SealedStream:
    """One direction of ``stream`` under ``key``: ``write`` seals a record, ``read_record`` opens the next one,
    each read exactly (``exact_reads``) into buffers kept for the next."""

    def __init__(self, stream: trio.abc.Stream, key: bytes) -> None:
        self.stream = stream
        self._sealer = Sealer(key)
        self._opener = Opener(key)
        self._writing = False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data`` as the next record and send it. One task writes at a time (BusyResourceError
        otherwise): every record is sealed into the same buffer."""
        if not data:  # an empty record carries nothing
            return
        if self._writing:
            raise trio.BusyResourceError("another task is writing this sealed stream")
        self._writing = True
        try:
            await self.stream.send_all(self._sealer.seal(data))
        finally:
            self._writing = False

    async def read_record(self) -> memoryview | None:
        """The plaintext of the next record as it was written, valid until the next call; None at a clean end
        between records."""
        head = bytearray(_LENGTH.size)
        got = await receive_into(self.stream, memoryview(head))
        if got == 0:
            return None
        if got < len(head):
            raise SealError(f"the stream ended inside a sealed record's length ({got} bytes)")
        sealed = self._opener.sealed_buffer(self._opener.length(head))
        if await receive_into(self.stream, sealed) < len(sealed):
            raise SealError(f"the stream ended inside a sealed record of {len(sealed)} bytes")
        return self._opener.open(sealed)

    async def aclose(self) -> None:
        await self.stream.aclose()
