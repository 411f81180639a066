"""Signed envelopes: round trips, every rejection reason, tampering, and a replay guard with bounded memory."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_pair
from libp2p.peer.id import ID

from hexgen.daemon.envelope import (
    Envelope,
    EnvelopeRejected,
    MalformedEnvelope,
    ReplayGuard,
    canonical_bytes,
    from_wire,
    seal,
    to_wire,
    verify,
)
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.wire import FrameError, decode_payload, encode_frame

NOW = 1_700_000_000.0
ALICE = create_new_key_pair(b"a" * 32)
MALLORY = create_new_key_pair(b"m" * 32)
BODY = {"gpus": [{"type": "H100", "memory_gb": 80}], "load": 0.25, "shards": ["llama:0-40"], "blob": b"\x00"}


def sealed(body: Any = BODY, kind: str = "advert", key_pair: KeyPair = ALICE, ttl_s: float = 30.0) -> Envelope:
    return seal(kind, body, key_pair, ttl_s, now=NOW)


def rejection(env: Envelope, **kwargs: Any) -> str:
    """The reason code ``verify`` gives for ``env``; fails the test if it accepts it."""
    kwargs.setdefault("kind", "advert")
    kwargs.setdefault("now", NOW + 1)
    with pytest.raises(EnvelopeRejected) as info:
        verify(env, **kwargs)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


def test_seal_then_verify_through_a_frame() -> None:
    env = sealed()
    received = from_wire(decode_payload(encode_frame(to_wire(env))[4:]))
    assert received == env
    assert verify(received, kind="advert", now=NOW + 1, sender=peer_id_of(ALICE), replay=ReplayGuard(60)) is received
    assert env.signer == peer_id_of(ALICE) and env.signer.startswith("12D3KooW")
    assert env.expires == NOW + 30 and len(env.nonce) == 16 and len(env.signature) == 64


def test_kind_may_be_a_set_or_any() -> None:
    env = sealed(kind="lease")
    assert verify(env, kind={"lease", "plan"}, now=NOW)
    assert verify(env, kind=None, now=NOW)
    assert rejection(env, kind={"advert", "plan"}) == "wrong-kind"


def test_canonical_bytes_ignore_map_order_and_int_vs_float_times() -> None:
    nonce = bytes(16)
    a = canonical_bytes("k", {"b": 1, "a": {"y": 2, "x": [1, (2, 3)]}}, "s", 5, 6, nonce)
    b = canonical_bytes("k", {"a": {"x": [1, [2, 3]], "y": 2}, "b": 1}, "s", 5.0, 6.0, nonce)
    assert a == b
    assert msgpack.unpackb(a)[0] == b"hexgen/envelope/1"


def test_a_reordered_body_still_verifies() -> None:
    env = sealed(body={"b": 1, "a": 2})
    assert verify(dataclasses.replace(env, body={"a": 2, "b": 1}), kind="advert", now=NOW)


def test_nonces_differ() -> None:
    assert sealed().nonce != sealed().nonce


@pytest.mark.parametrize(
    "change",
    [
        {"body": {**BODY, "load": 0.5}},
        {"body": {**BODY, "blob": "\x00"}},  # str where bytes were signed
        {"kind": "plan"},
        {"expires": NOW + 3600},
        {"issued": NOW - 1},
        {"nonce": b"\x01" * 16},
        {"signature": bytes(64)},
    ],
)
def test_tampering_breaks_the_signature(change: dict[str, Any]) -> None:
    env = dataclasses.replace(sealed(), **change)
    assert rejection(env, kind=None) == "bad-signature"


def test_swapping_in_another_signer() -> None:
    env = sealed()
    assert rejection(dataclasses.replace(env, signer=peer_id_of(MALLORY))) == "bad-signature"
    # Mallory re-signing Alice's body is fine as Mallory's own statement, but not from Alice's connection.
    stolen = sealed(key_pair=MALLORY)
    assert rejection(stolen, sender=peer_id_of(ALICE)) == "signer-mismatch"
    assert rejection(env, sender=peer_id_of(MALLORY)) == "signer-mismatch"


@pytest.mark.parametrize(
    "signer",
    [
        "not base58 0OIl",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # a sha256 (RSA-style) peer id: no key inside
        ID.from_pubkey(create_secp256k1_pair().public_key).to_base58(),  # inlined, but not Ed25519
        "1" + peer_id_of(ALICE),  # same key bytes after a leading zero byte: not the canonical form
    ],
)
def test_signers_that_are_not_canonical_ed25519_peer_ids(signer: str) -> None:
    assert rejection(dataclasses.replace(sealed(), signer=signer)) == "bad-signer"


def test_time_window_with_skew() -> None:
    env = sealed(ttl_s=30)
    assert verify(env, kind="advert", now=NOW - 5)  # issued up to max_skew_s in the future
    assert rejection(env, now=NOW - 5.01) == "not-yet-valid"
    assert verify(env, kind="advert", now=NOW + 35)  # accepted until expires + max_skew_s
    assert rejection(env, now=NOW + 35.01) == "expired"
    assert rejection(env, now=NOW + 31, max_skew_s=0) == "expired"


@pytest.mark.parametrize(
    "change",
    [
        {"kind": ""},
        {"kind": 5},
        {"kind": "k" * 65},
        {"signer": b"bytes"},
        {"issued": float("nan")},
        {"expires": float("inf")},
        {"issued": True},
        {"expires": NOW - 1},
        {"nonce": b"short"},
        {"signature": "text"},
        {"body": {1: "int key"}},
        {"body": {"set": {1, 2}}},
        {"body": [2**64]},
    ],
)
def test_malformed_fields(change: dict[str, Any]) -> None:
    env = dataclasses.replace(sealed(), **change)
    assert rejection(env, kind=None) == "malformed"
    with pytest.raises(MalformedEnvelope):
        from_wire({**to_wire(sealed()), **change})


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [1, 2],
        {},
        {key: value for key, value in to_wire(sealed()).items() if key != "nonce"},
        {**to_wire(sealed()), "extra": 1},
        {**to_wire(sealed()), "body": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
    ],
)
def test_from_wire_refuses_other_shapes(obj: Any) -> None:
    with pytest.raises(MalformedEnvelope):
        from_wire(obj)


def test_from_wire_turns_integer_times_into_floats() -> None:
    env = seal("advert", {}, ALICE, 30, now=1_700_000_000)
    wire = {**to_wire(env), "issued": 1_700_000_000, "expires": 1_700_000_030}
    received = from_wire(wire)
    assert isinstance(received.issued, float) and verify(received, kind="advert", now=NOW)


def test_seal_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        seal("advert", {}, ALICE, 0)
    with pytest.raises(ValueError, match="keys must be strings"):
        seal("advert", {1: 2}, ALICE, 10)
    with pytest.raises(ValueError, match="kind"):
        seal("", {}, ALICE, 10)
    with pytest.raises(ValueError, match="Ed25519"):
        seal("advert", {}, create_secp256k1_pair(), 10)


from hexgen.testing.plans import json_like  # noqa: E402

wire_values = st.one_of(st.integers(), st.floats(), st.text(max_size=70), st.binary(max_size=70), st.none(), json_like)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["kind", "body", "signer", "issued", "expires", "nonce", "signature", "x"]), wire_values
    )
)
def test_random_maps_give_only_malformed_or_rejected(obj: dict[str, Any]) -> None:
    with contextlib.suppress(EnvelopeRejected):
        verify(from_wire(obj), kind=None, now=NOW, replay=ReplayGuard(60))


@settings(max_examples=100, deadline=None)
@given(json_like)
def test_any_body_round_trips_and_verifies(body: Any) -> None:
    env = sealed(body=body)
    received = from_wire(decode_payload(encode_frame(to_wire(env))[4:]))
    assert verify(received, kind="advert", now=NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_decoding_and_verifying(data: bytes) -> None:
    with contextlib.suppress(EnvelopeRejected, FrameError):
        verify(from_wire(decode_payload(data)), kind=None, now=NOW)


# --- replay ---------------------------------------------------------------------------------------------


def test_replays_are_refused_and_forgeries_do_not_fill_the_guard() -> None:
    guard = ReplayGuard(window_s=60, max_entries=10)
    env = sealed()
    assert verify(env, kind="advert", now=NOW + 1, replay=guard)
    assert rejection(env, now=NOW + 2, replay=guard) == "replayed"
    forged = dataclasses.replace(sealed(), signature=bytes(64))
    assert rejection(forged, now=NOW + 2, replay=guard) == "bad-signature"
    assert len(guard) == 1


def test_same_nonce_from_two_signers_is_two_entries() -> None:
    guard = ReplayGuard(window_s=60)
    guard.admit("a", bytes(16), NOW, NOW + 30, NOW)
    guard.admit("b", bytes(16), NOW, NOW + 30, NOW)
    assert len(guard) == 2


def test_envelopes_issued_before_the_window_are_stale() -> None:
    guard = ReplayGuard(window_s=10)
    env = sealed(ttl_s=3600)
    assert rejection(env, now=NOW + 11, replay=guard) == "stale"
    assert verify(env, kind="advert", now=NOW + 10, replay=guard)


def test_entries_are_forgotten_once_the_envelope_could_not_pass_anyway() -> None:
    guard = ReplayGuard(window_s=100)
    guard.admit("a", b"1" * 16, NOW, NOW + 5, NOW)  # dies by expiry
    guard.admit("a", b"2" * 16, NOW, NOW + 500, NOW)  # dies by the window
    guard.admit("a", b"3" * 16, NOW + 1, NOW + 500, NOW + 1)
    assert len(guard) == 3
    guard.admit("b", b"4" * 16, NOW + 6, NOW + 10, NOW + 6)
    assert len(guard) == 3
    guard.admit("b", b"5" * 16, NOW + 100.5, NOW + 200, NOW + 100.5)
    assert len(guard) == 2  # the window dropped nonce 2; nonce 3 still lives until NOW + 101


def test_memory_is_bounded_and_eviction_never_reopens_a_replay() -> None:
    guard = ReplayGuard(window_s=1000, max_entries=100)
    envelopes = [seal("advert", {"n": i}, ALICE, 500, now=NOW + i) for i in range(250)]
    for env in envelopes:
        verify(env, kind="advert", now=NOW + 250, replay=guard)
        assert len(guard) <= 100
    assert len(guard._by_issued) + len(guard._by_forget_at) <= 4 * 100 + 66
    for env in envelopes:
        assert rejection(env, now=NOW + 251, replay=guard) in {"replayed", "stale"}
    # A fresh envelope is still welcome.
    assert verify(seal("advert", {}, ALICE, 500, now=NOW + 260), kind="advert", now=NOW + 260, replay=guard)


def test_heaps_stay_bounded_when_entries_only_expire() -> None:
    guard = ReplayGuard(window_s=5, max_entries=1_000_000)
    for i in range(5000):
        guard.admit("a", i.to_bytes(16, "big"), NOW + i, NOW + i + 1, NOW + i)
    assert len(guard) <= 2
    assert len(guard._by_issued) + len(guard._by_forget_at) < 100


@pytest.mark.parametrize(("window_s", "max_entries"), [(0, 10), (float("nan"), 10), (10, 0)])
def test_replay_guard_arguments(window_s: float, max_entries: int) -> None:
    with pytest.raises(ValueError):
        ReplayGuard(window_s, max_entries)
