"""Signed envelopes: adverts, leases and plans, each signed by the node that issued it, with expiry and replay checks.

An envelope carries ``kind`` (what the body is), ``body`` (any msgpack value whose maps have str keys),
``signer`` (the issuer's base58 Ed25519 peer id), ``issued`` and ``expires`` (Unix seconds), a random
16-byte ``nonce`` and ``signature``: the signer's libp2p Ed25519 signature over the canonical bytes,
msgpack of ``[b"hexgen/envelope/1", kind, body with map keys sorted at every level, signer, issued,
expires, nonce]`` with both times as float64. Verifiers need no key directory: an Ed25519 peer id inlines
its public key.

``verify`` raises ``EnvelopeRejected`` with a short reason code (``reason``) and a message:
``malformed``, ``wrong-kind``, ``signer-mismatch``, ``bad-signer``, ``not-yet-valid``, ``expired``,
``bad-signature``, ``replayed``, ``stale``.
"""

from __future__ import annotations

import heapq
import math
import os
import sys
import time
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hexgen.daemon.node_key import KeyPair, is_ed25519, peer_id_of, public_key_from_peer_id, sign, signature_holds
from hexgen.daemon.private_files import IdentityError

DOMAIN = b"hexgen/envelope/1"
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
MAX_KIND_CHARS = 64
MAX_SIGNER_CHARS = 128
# Deeper bodies are refused rather than risk Python's recursion limit; real messages nest a few levels.
MAX_BODY_DEPTH = 32
WIRE_FIELDS = frozenset({"kind", "body", "signer", "issued", "expires", "nonce", "signature"})
INT_RANGE = (-(1 << 63), (1 << 64) - 1)


class EnvelopeRejected(Exception):
    """An envelope that must not be acted on. ``reason`` is a short code, ``message`` says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class MalformedEnvelope(EnvelopeRejected):
    """An envelope with missing fields or fields of the wrong type or size (reason ``malformed``)."""

    def __init__(self, message: str) -> None:
        super().__init__("malformed", message)


@dataclass(frozen=True)
class Envelope:
    """A signed statement by ``signer``; see the module docstring for the fields and what is signed."""

    kind: str
    body: Any
    signer: str
    issued: float
    expires: float
    nonce: bytes
    signature: bytes


def _canonical(value: Any, depth: int = 0) -> Any:
    """``value`` with every map's keys sorted, lists for tuples; ``MalformedEnvelope`` for anything else.

    Allowed: nil, bool, int (64-bit), float, str, bytes, lists/tuples, and maps with str keys.
    """
    if depth > MAX_BODY_DEPTH:
        raise MalformedEnvelope(f"body is nested deeper than {MAX_BODY_DEPTH} levels")
    if value is None or isinstance(value, bool | float | str | bytes):
        return value
    if isinstance(value, int):
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise MalformedEnvelope("body holds an integer outside the 64-bit range")
        return value
    if isinstance(value, list | tuple):
        return [_canonical(item, depth + 1) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise MalformedEnvelope("body map keys must be strings")
        return {key: _canonical(value[key], depth + 1) for key in sorted(value)}
    raise MalformedEnvelope(f"body holds a {type(value).__name__}, which has no canonical msgpack form")


def canonical_bytes(kind: str, body: Any, signer: str, issued: float, expires: float, nonce: bytes) -> bytes:
    """The bytes an envelope's signature covers (see the module docstring).

    Raises ``MalformedEnvelope`` if ``body`` has no canonical form.
    """
    fields = [DOMAIN, kind, _canonical(body), signer, float(issued), float(expires), nonce]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def _is_finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite as a float (an int beyond 1.8e308 is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max


def _check_fields(env: Envelope) -> None:
    """Raise ``MalformedEnvelope`` unless every field has the right type and size (signature unchecked)."""
    if not isinstance(env.kind, str) or not 0 < len(env.kind) <= MAX_KIND_CHARS:
        raise MalformedEnvelope(f"kind must be a string of 1 to {MAX_KIND_CHARS} characters")
    if not isinstance(env.signer, str) or not 0 < len(env.signer) <= MAX_SIGNER_CHARS:
        raise MalformedEnvelope("signer must be a peer id string")
    if not _is_finite_number(env.issued) or not _is_finite_number(env.expires):
        raise MalformedEnvelope("issued and expires must be finite numbers")
    if env.expires <= env.issued:
        raise MalformedEnvelope("expires must be after issued")
    if not isinstance(env.nonce, bytes) or len(env.nonce) != NONCE_BYTES:
        raise MalformedEnvelope(f"nonce must be {NONCE_BYTES} bytes")
    if not isinstance(env.signature, bytes) or len(env.signature) != SIGNATURE_BYTES:
        raise MalformedEnvelope(f"signature must be {SIGNATURE_BYTES} bytes")


def seal(kind: str, body: Any, key_pair: KeyPair, ttl_s: float, now: float | None = None) -> Envelope:
    """An envelope of ``kind`` carrying ``body``, signed with ``key_pair``, valid for ``ttl_s`` seconds.

    ``now`` (default: the current time) becomes ``issued``. Raises ``ValueError`` for a key that is not
    Ed25519, a ``ttl_s`` that is not a positive finite number, a bad ``kind``, or a body that has no
    canonical form.
    """
    if not is_ed25519(key_pair):
        raise ValueError("envelopes are signed with Ed25519 node keys")
    if not (_is_finite_number(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a positive number of seconds, not {ttl_s!r}")
    issued = float(time.time() if now is None else now)
    expires = issued + float(ttl_s)
    signer = peer_id_of(key_pair)
    nonce = os.urandom(NONCE_BYTES)
    try:
        unsigned = Envelope(kind, body, signer, issued, expires, nonce, bytes(SIGNATURE_BYTES))
        _check_fields(unsigned)
        signed = canonical_bytes(kind, body, signer, issued, expires, nonce)
    except MalformedEnvelope as exc:
        raise ValueError(exc.message) from None
    return Envelope(kind, body, signer, issued, expires, nonce, sign(key_pair, signed))


def to_wire(env: Envelope) -> dict[str, Any]:
    """The envelope as a msgpack-ready map (field name -> value), for a frame or a gossip message."""
    return {
        "kind": env.kind,
        "body": env.body,
        "signer": env.signer,
        "issued": float(env.issued),
        "expires": float(env.expires),
        "nonce": env.nonce,
        "signature": env.signature,
    }


def from_wire(obj: Any) -> Envelope:
    """The envelope in a decoded ``to_wire`` map; ``MalformedEnvelope`` for any other shape.

    Checks types, sizes and that the body has a canonical form, not the signature: call ``verify``.
    Unknown fields are refused, since they would not be covered by the signature.
    """
    if not isinstance(obj, dict):
        raise MalformedEnvelope("an envelope is a map")
    if set(obj) != WIRE_FIELDS:
        missing = sorted(WIRE_FIELDS - set(obj))
        extra = sorted(str(key) for key in set(obj) - WIRE_FIELDS)
        raise MalformedEnvelope(f"envelope fields: missing {missing}, unexpected {extra}")
    env = Envelope(
        obj["kind"], obj["body"], obj["signer"], obj["issued"], obj["expires"], obj["nonce"], obj["signature"]
    )
    _check_fields(env)
    _canonical(env.body)
    return Envelope(env.kind, env.body, env.signer, float(env.issued), float(env.expires), env.nonce, env.signature)


@dataclass(eq=False)
class ReplayGuard:
    """Remembers the (signer, nonce) of accepted envelopes so each is accepted at most once.

    An envelope issued more than ``window_s`` before ``now`` is refused as ``stale``, so an entry needs
    keeping only until the envelope could no longer pass ``verify`` anyway: the earlier of its
    ``valid_until`` and ``issued + window_s``. Memory is bounded by ``max_entries``: when full, the entry
    issued earliest is evicted and, so that its envelope still cannot come back, everything issued at or
    before it is refused as ``stale`` from then on. Time comes only from the ``now`` arguments.
    """

    window_s: float
    max_entries: int = 65536
    _forget_at: dict[tuple[str, bytes], float] = field(default_factory=dict, init=False, repr=False)
    _issued: dict[tuple[str, bytes], float] = field(default_factory=dict, init=False, repr=False)
    # Heaps of (time, key); an entry whose key was dropped through the other heap is skipped when met.
    _by_forget_at: list[tuple[float, tuple[str, bytes]]] = field(default_factory=list, init=False, repr=False)
    _by_issued: list[tuple[float, tuple[str, bytes]]] = field(default_factory=list, init=False, repr=False)
    _evicted_up_to: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (_is_finite_number(self.window_s) and self.window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, not {self.window_s!r}")
        if not isinstance(self.max_entries, int) or self.max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, not {self.max_entries!r}")

    def __len__(self) -> int:
        return len(self._forget_at)

    def admit(self, signer: str, nonce: bytes, issued: float, valid_until: float, now: float) -> None:
        """Record an envelope as seen, or raise ``EnvelopeRejected`` (``replayed`` or ``stale``).

        ``valid_until`` is the last moment ``verify`` would accept the envelope (expiry plus clock skew).
        """
        self._forget_expired(now)
        if issued < now - self.window_s:
            raise EnvelopeRejected("stale", f"issued {now - issued:.1f} s ago, outside the {self.window_s} s window")
        if issued <= self._evicted_up_to:
            raise EnvelopeRejected("stale", "issued before the oldest envelope the replay guard still remembers")
        key = (signer, nonce)
        if key in self._forget_at:
            raise EnvelopeRejected("replayed", f"envelope from {signer} with this nonce was already accepted")
        while len(self._forget_at) >= self.max_entries:
            self._evict_earliest_issued()
        forget_at = min(valid_until, issued + self.window_s)
        self._forget_at[key] = forget_at
        self._issued[key] = issued
        heapq.heappush(self._by_forget_at, (forget_at, key))
        heapq.heappush(self._by_issued, (issued, key))
        self._compact_heaps()

    def _forget_expired(self, now: float) -> None:
        """Drop entries whose envelopes can no longer pass ``verify`` at ``now``."""
        while self._by_forget_at and self._by_forget_at[0][0] < now:
            forget_at, key = heapq.heappop(self._by_forget_at)
            if self._forget_at.get(key) == forget_at:
                del self._forget_at[key]
                del self._issued[key]

    def _evict_earliest_issued(self) -> None:
        """Drop the remembered entry issued earliest and refuse everything issued up to then."""
        while self._by_issued:
            issued, key = heapq.heappop(self._by_issued)
            if self._issued.get(key) == issued:
                del self._forget_at[key]
                del self._issued[key]
                self._evicted_up_to = max(self._evicted_up_to, issued)
                return

    def _compact_heaps(self) -> None:
        """Rebuild the heaps when skipped entries make up most of them, keeping memory bounded."""
        if len(self._by_forget_at) + len(self._by_issued) > 4 * len(self._forget_at) + 64:
            self._by_forget_at = [(t, key) for key, t in self._forget_at.items()]
            self._by_issued = [(t, key) for key, t in self._issued.items()]
            heapq.heapify(self._by_forget_at)
            heapq.heapify(self._by_issued)


def verify(
    env: Envelope,
    *,
    kind: str | Set[str] | None,
    now: float,
    sender: str | None = None,
    replay: ReplayGuard | None = None,
    max_skew_s: float = 5.0,
) -> Envelope:
    """Return ``env`` if it may be acted on at time ``now``; raise ``EnvelopeRejected`` otherwise.

    - ``kind``: the kind, or set of kinds, expected here (None: any) -> ``wrong-kind``.
    - ``sender``: the peer id of the connection or gossip source that delivered it, if known; it must be
      the signer -> ``signer-mismatch`` (a node relays only its own statements).
    - the signer must be a canonical Ed25519 peer id -> ``bad-signer``.
    - ``issued`` may be at most ``max_skew_s`` ahead of ``now`` -> ``not-yet-valid``; it is accepted until
      ``expires + max_skew_s`` -> ``expired``.
    - the signature must hold -> ``bad-signature``.
    - with ``replay``, each (signer, nonce) is accepted once, and only within the guard's window ->
      ``replayed`` / ``stale``. The guard records an envelope only after every other check passed, so
      forgeries cannot fill it.
    """
    _check_fields(env)
    expected = {kind} if isinstance(kind, str) else kind
    if expected is not None and env.kind not in expected:
        raise EnvelopeRejected("wrong-kind", f"expected {' or '.join(sorted(expected))}, got {env.kind!r}")
    if sender is not None and sender != env.signer:
        raise EnvelopeRejected("signer-mismatch", f"signed by {env.signer} but delivered by {sender}")
    try:
        public_key = public_key_from_peer_id(env.signer)
    except IdentityError as exc:
        raise EnvelopeRejected("bad-signer", str(exc)) from None
    if env.issued > now + max_skew_s:
        raise EnvelopeRejected("not-yet-valid", f"issued {env.issued - now:.1f} s in the future")
    valid_until = env.expires + max_skew_s
    if now > valid_until:
        raise EnvelopeRejected("expired", f"expired {now - env.expires:.1f} s ago")
    signed = canonical_bytes(env.kind, env.body, env.signer, env.issued, env.expires, env.nonce)
    if not signature_holds(public_key, signed, env.signature):
        raise EnvelopeRejected("bad-signature", f"{env.kind} envelope does not carry a valid signature by {env.signer}")
    if replay is not None:
        replay.admit(env.signer, env.nonce, env.issued, valid_until, now)
    return env
