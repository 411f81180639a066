"""Node key files, swarm keys and membership certificates: creation, permissions, corruption, every refusal."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_pair
from libp2p.identity_utils import load_identity, save_identity

from hexgen.daemon.certificates import (
    Certificate,
    CertificateError,
    certificate_text,
    create_swarm_key,
    issue_certificate,
    load_certificate,
    load_swarm_key,
    swarm_public_key,
    verify_certificate,
    write_certificate,
)
from hexgen.daemon.node_key import (
    create_key_file,
    default_key_file,
    load_key,
    load_or_create_key,
    peer_id_of,
    public_key_from_peer_id,
)
from hexgen.daemon.private_files import IdentityError, KeyFileExists, default_data_dir

NOW = 1_700_000_000.0
PEER = peer_id_of(create_new_key_pair(b"p" * 32))
OTHER_PEER = peer_id_of(create_new_key_pair(b"q" * 32))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "hexgen"
    assert default_key_file() == tmp_path / "hexgen" / "node.key"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/path")  # the XDG spec says to ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "hexgen"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "hexgen"


def test_first_start_creates_a_private_key_and_later_starts_reuse_it(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "node.key"
    first = load_or_create_key(path)
    assert mode(path) == 0o600
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    again = load_or_create_key(path)
    assert peer_id_of(again) == peer_id_of(first)
    assert peer_id_of(first).startswith("12D3KooW")
    assert not [p for p in path.parent.iterdir() if p.name != "node.key"], "temporary files left behind"


def test_key_file_format_is_libp2ps_own(tmp_path: Path) -> None:
    ours = tmp_path / "ours.key"
    key_pair = create_key_file(ours)
    assert peer_id_of(load_identity(ours)) == peer_id_of(key_pair)
    theirs = tmp_path / "theirs.key"
    save_identity(key_pair, theirs)
    assert mode(theirs) == 0o600
    assert peer_id_of(load_key(theirs)) == peer_id_of(key_pair)


def test_create_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = create_key_file(path)
    with pytest.raises(KeyFileExists):
        create_key_file(path)
    assert peer_id_of(load_key(path)) == peer_id_of(first)
    second = create_key_file(path, force=True)
    assert peer_id_of(load_key(path)) == peer_id_of(second) != peer_id_of(first)
    assert mode(path) == 0o600


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match=r"accessible to other users \(mode 0644\); run: chmod 600"):
        load_or_create_key(path)


@pytest.mark.parametrize("content", [b"", b"garbage", bytes(36), b"\x08\x01\x12\x05short"])
def test_corrupt_key_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=f"key file {path} is corrupt"):
        load_or_create_key(path)


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_identity(create_secp256k1_pair(), path)
    with pytest.raises(IdentityError, match="Secp256k1 key; hexgen needs Ed25519"):
        load_key(path)


def test_key_file_problems(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(IdentityError, match="is a directory"):
        load_key(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(IdentityError, match="cannot create"):
        create_key_file(blocker / "node.key")
    huge = tmp_path / "huge.key"
    huge.write_bytes(bytes(100_000))
    huge.chmod(0o600)
    with pytest.raises(IdentityError, match="too large"):
        load_key(huge)


def test_peer_id_parsing() -> None:
    key_pair = create_new_key_pair(b"p" * 32)
    assert public_key_from_peer_id(PEER).to_bytes() == key_pair.public_key.to_bytes()
    for bad in ["", "Qm", "0OIl", "x" * 200, "1" + PEER, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]:
        with pytest.raises(IdentityError, match="not an Ed25519 peer id"):
            public_key_from_peer_id(bad)


# --- swarm keys and certificates --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("swarm") / "swarm.key"
    return path, swarm_public_key(create_swarm_key(path))


def test_swarm_key_file(swarm: tuple[Path, bytes], tmp_path: Path) -> None:
    path, public_key = swarm
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert swarm_public_key(load_swarm_key(path)) == public_key and len(public_key) == 32
    with pytest.raises(KeyFileExists):
        create_swarm_key(path)
    other = tmp_path / "other.key"
    create_swarm_key(other)
    assert swarm_public_key(create_swarm_key(other, force=True)) == swarm_public_key(load_swarm_key(other))


@pytest.mark.parametrize(
    "content", [b"", b"not pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_bad_swarm_key_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "swarm.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=f"swarm key file {path} is unusable"):
        load_swarm_key(path)


def test_certificate_round_trip(swarm: tuple[Path, bytes], tmp_path: Path) -> None:
    path, public_key = swarm
    cert_bytes = issue_certificate(load_swarm_key(path), PEER, valid_s=3600, now=NOW)
    cert = verify_certificate(cert_bytes, public_key, PEER, now=NOW + 10)
    assert (cert.peer_id, cert.issued, cert.expires) == (PEER, NOW, NOW + 3600)
    assert Certificate.from_bytes(cert.to_bytes()) == cert
    assert len(cert.swarm_id) == 16 and int(cert.swarm_id, 16) >= 0
    cert_file = tmp_path / "peer.cert"
    write_certificate(cert_file, cert_bytes)
    assert load_certificate(cert_file) == cert
    assert verify_certificate(load_certificate(cert_file), public_key, PEER, NOW) == cert
    with pytest.raises(KeyFileExists):
        write_certificate(cert_file, cert_bytes)
    text = cert_file.read_text()
    assert f"# peer:    {PEER}" in text and "# expires: 2023-11-14T23:13:20Z" in text


def test_certificate_without_expiry(swarm: tuple[Path, bytes]) -> None:
    path, public_key = swarm
    cert_bytes = issue_certificate(load_swarm_key(path), PEER, valid_s=None, now=NOW)
    assert verify_certificate(cert_bytes, public_key, PEER, now=NOW + 1e9).expires is None
    assert "# expires: never" in certificate_text(cert_bytes)


def cert_reason(cert: bytes | Certificate, public_key: bytes, peer_id: str = PEER, now: float = NOW) -> str:
    with pytest.raises(CertificateError) as info:
        verify_certificate(cert, public_key, peer_id, now)
    return info.value.reason


def test_certificate_rejections(swarm: tuple[Path, bytes], tmp_path: Path) -> None:
    path, public_key = swarm
    swarm_key = load_swarm_key(path)
    cert = Certificate.from_bytes(issue_certificate(swarm_key, PEER, valid_s=60, now=NOW))
    other_swarm_key = create_swarm_key(tmp_path / "other.key")
    assert cert_reason(cert, swarm_public_key(other_swarm_key)) == "other-swarm"
    assert cert_reason(cert, public_key, peer_id=OTHER_PEER) == "other-peer"
    assert cert_reason(cert, public_key, now=NOW + 60) == "expired"
    for change in [{"expires": None}, {"issued": NOW - 1}, {"signature": bytes(64)}]:
        assert cert_reason(dataclasses.replace(cert, **change), public_key) == "bad-signature"
    assert cert_reason(dataclasses.replace(cert, peer_id=OTHER_PEER), public_key, OTHER_PEER) == "bad-signature"
    # A certificate signed by another swarm's key but claiming this swarm.
    forged = Certificate.from_bytes(issue_certificate(other_swarm_key, PEER, valid_s=60, now=NOW))
    assert cert_reason(dataclasses.replace(forged, swarm_public_key=public_key), public_key) == "bad-signature"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"swarm": b"x", "peer": PEER, "issued": NOW, "expires": None, "sig": bytes(64)}),
        msgpack.packb({"swarm": bytes(32), "peer": PEER, "issued": NOW, "expires": NOW, "sig": bytes(64)}),
        msgpack.packb({"swarm": bytes(32), "peer": PEER, "issued": "now", "expires": None, "sig": bytes(64)}),
        msgpack.packb({"swarm": bytes(32), "peer": "", "issued": NOW, "expires": None, "sig": bytes(64)}),
        msgpack.packb({"swarm": bytes(32), "peer": PEER, "issued": NOW, "expires": None, "sig": bytes(63)}),
        msgpack.packb({"swarm": bytes(32), "peer": PEER, "issued": NOW, "expires": None, "sig": bytes(64), "x": 1}),
    ],
)
def test_malformed_certificates(data: bytes) -> None:
    assert cert_reason(data, bytes(32)) == "malformed"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"no block here", "malformed"),
        (b"-----BEGIN HEXGEN SWARM CERTIFICATE-----\n!!!\n-----END HEXGEN SWARM CERTIFICATE-----\n", "malformed"),
        (b"-----END HEXGEN SWARM CERTIFICATE-----\n-----BEGIN HEXGEN SWARM CERTIFICATE-----\n", "malformed"),
        (b"\xff\xfe", "malformed"),
    ],
)
def test_bad_certificate_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "peer.cert"
    path.write_bytes(content)
    with pytest.raises(CertificateError, match=str(path)) as info:
        load_certificate(path)
    assert info.value.reason == reason
    with pytest.raises(CertificateError) as info:
        load_certificate(tmp_path / "missing.cert")
    assert info.value.reason == "unreadable"


def test_issue_refuses_bad_peer_ids_and_lifetimes(swarm: tuple[Path, bytes]) -> None:
    swarm_key = load_swarm_key(swarm[0])
    with pytest.raises(IdentityError):
        issue_certificate(swarm_key, "not-a-peer", valid_s=60)
    for bad in [0, -1, float("nan"), float("inf")]:
        with pytest.raises(ValueError):
            issue_certificate(swarm_key, PEER, valid_s=bad)


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_umask_does_not_loosen_modes(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "d" / "node.key"
        create_key_file(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
