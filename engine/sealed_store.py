"""A torch.distributed store whose values are sealed (AES-GCM) with a world's secret.

The rendezvous store is a plain TCP key-value server: anyone who reaches its port can list, read and write
every key. Sealing each value with a key only the world's members hold, bound to the key it is stored
under, means an outsider learns neither the workers' addresses nor an NCCL unique id, and a value it writes
(or copies from another key) makes the worker that reads it refuse the rendezvous instead of connecting to
the outsider. Counters (``add``) stay in the clear; tampering with them can stall a world, not join it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch.distributed.distributed_c10d import Store

from hexgen.engine.bounds import SECRET_BYTES

NONCE_BYTES = 12


class RendezvousRefused(RuntimeError):
    """A value in the store is not sealed with this world's secret: someone outside the world wrote it."""


class SealedStore(Store):
    """Wraps ``inner``; ``set`` seals, ``get`` opens and refuses what does not open."""

    def __init__(self, inner: Store, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a world secret is {SECRET_BYTES} bytes, not {len(secret)}")
        super().__init__()
        self.inner = inner
        self.aead = AESGCM(secret)

    def set(self, key: str, value: bytes | str) -> None:
        plain = value.encode() if isinstance(value, str) else bytes(value)
        nonce = os.urandom(NONCE_BYTES)
        self.inner.set(key, nonce + self.aead.encrypt(nonce, plain, key.encode()))  # type: ignore[arg-type]  # torch's stub says str; stores take bytes

    def get(self, key: str) -> bytes:
        sealed = self.inner.get(key)
        try:
            return self.aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], key.encode())
        except (InvalidTag, ValueError):
            raise RendezvousRefused(
                f"the rendezvous value under {key!r} is not sealed with this world's secret"
            ) from None

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        raise RendezvousRefused("compare_set cannot be sealed; no hexgen world uses it")

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)


def open_store(host: str, port: int, timeout: timedelta, secret: bytes | None, world_size: int | None = None) -> Store:
    """A client of the TCPStore at ``host:port``, sealed with ``secret`` (None: in the clear, for worlds
    that never leave one trusted machine, as in tests)."""
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)  # type: ignore[attr-defined]  # re-exported undeclared
    if secret is None:
        return store
    return UnreachableStore(store, secret) if os.environ.get(UNREACHABLE_ENV) == "1" else SealedStore(store, secret)


UNREACHABLE_ENV = "HEXGEN_TEST_UNREACHABLE"  # tests only: this process's gloo addresses cannot be reached


class UnreachableStore(SealedStore):
    """Tests only: publishes every gloo address of this process with port 1 (nothing listens there), so
    its peers' connections are refused as if a firewall stood between them (a real connect failure,
    which the failure path cannot tell from any other)."""

    def set(self, key: str, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        # gloo's address record: a sockaddr at byte 18 (AF_INET is 2, little-endian), its port at 20
        if key.rsplit("/", 2)[-1].isdigit() and len(raw) >= 26 and raw[18:20] == b"\x02\x00":
            raw = raw[:20] + (1).to_bytes(2, "big") + raw[22:]
        super().set(key, raw)
