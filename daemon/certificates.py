"""Private-swarm membership: the swarm key and the certificates it signs.

A private swarm has its own Ed25519 swarm key (PKCS#8 PEM, mode 0600) held by whoever admits nodes; a
membership certificate is the swarm key's signature over (swarm public key, peer id, issued, expires).
Certificates travel as msgpack bytes (``Certificate.to_bytes``) and are stored in files as base64 between
BEGIN/END lines, after a few ``#`` comment lines a person can read.

File problems surface as ``IdentityError``, certificates that do not admit a peer as ``CertificateError``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hexgen.daemon.node_key import MAX_PEER_ID_CHARS, public_key_from_peer_id
from hexgen.daemon.private_files import (
    MAX_KEY_FILE_BYTES,
    IdentityError,
    default_data_dir,
    read_private_file,
    read_small_file,
    write_private_file,
)

SWARM_KEY_FILE_NAME = "swarm.key"
CERT_DOMAIN = b"hexgen/swarm-cert/1"
CERT_BEGIN = "-----BEGIN HEXGEN SWARM CERTIFICATE-----"
CERT_END = "-----END HEXGEN SWARM CERTIFICATE-----"
SWARM_PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class CertificateError(Exception):
    """A membership certificate that does not admit the peer; ``reason`` is a short code.

    Codes: ``malformed``, ``unreadable`` (file), ``other-swarm``, ``other-peer``, ``bad-signature``,
    ``expired``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def default_swarm_key_file() -> Path:
    """Where ``hexgen-node swarm-key`` writes unless told otherwise: ``default_data_dir() / "swarm.key"``."""
    return default_data_dir() / SWARM_KEY_FILE_NAME


def create_swarm_key(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """Generate a swarm key and write it to ``path`` as PKCS#8 PEM (mode 0600, parents 0700).

    Raises ``KeyFileExists`` if ``path`` exists and ``force`` is false, ``IdentityError`` if it cannot be
    written.
    """
    swarm_key = Ed25519PrivateKey.generate()
    pem = swarm_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem, replace=force)
    return swarm_key


def load_swarm_key(path: Path) -> Ed25519PrivateKey:
    """The swarm key stored in ``path``; ``IdentityError`` naming the file if it cannot be used."""
    data = read_private_file(path, "swarm key file")
    try:
        swarm_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        reason = "it is password-protected" if isinstance(exc, TypeError) else "it is not a PEM private key"
        raise IdentityError(f"swarm key file {path} is unusable: {reason}") from None
    except UnsupportedAlgorithm as exc:
        raise IdentityError(f"swarm key file {path} is unusable: {type(exc).__name__}") from None
    if not isinstance(swarm_key, Ed25519PrivateKey):
        raise IdentityError(f"swarm key file {path} does not hold an Ed25519 key")
    return swarm_key


def swarm_public_key(swarm_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public half of ``swarm_key``: what certificates name and nodes compare."""
    return swarm_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def swarm_id(public_key: bytes) -> str:
    """A short, stable name for a swarm in logs and status: 16 hex digits of SHA-256 of its public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class Certificate:
    """A swarm key's statement that ``peer_id`` is a member from ``issued`` until ``expires`` (None: no end).

    Times are Unix seconds. ``signature`` is the swarm key's Ed25519 signature over ``signed_bytes()``.
    """

    swarm_public_key: bytes
    peer_id: str
    issued: float
    expires: float | None
    signature: bytes

    @property
    def swarm_id(self) -> str:
        """The swarm's short name (see ``swarm_id``)."""
        return swarm_id(self.swarm_public_key)

    def signed_bytes(self) -> bytes:
        """The canonical bytes the swarm key signs: msgpack of [domain, swarm key, peer, issued, expires]."""
        return _certificate_signed_bytes(self.swarm_public_key, self.peer_id, self.issued, self.expires)

    def to_bytes(self) -> bytes:
        """The certificate as msgpack (a map), as it travels on the wire."""
        packed: bytes = msgpack.packb(
            {
                "swarm": self.swarm_public_key,
                "peer": self.peer_id,
                "issued": float(self.issued),
                "expires": None if self.expires is None else float(self.expires),
                "sig": self.signature,
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse ``to_bytes`` output; ``CertificateError("malformed")`` for anything else. Checks no signature."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_KEY_FILE_BYTES:
            raise CertificateError("malformed", "a certificate is a short byte string")
        try:
            fields = msgpack.unpackb(bytes(data), raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:  # TypeError: an unhashable map key
            raise CertificateError("malformed", f"not msgpack ({type(exc).__name__})") from None
        return _certificate_from_fields(fields)


def _certificate_signed_bytes(public_key: bytes, peer_id: str, issued: float, expires: float | None) -> bytes:
    """Canonical signed bytes of a certificate's fields (times as float64, so 5 and 5.0 sign alike)."""
    expires_field = None if expires is None else float(expires)
    packed: bytes = msgpack.packb([CERT_DOMAIN, public_key, peer_id, float(issued), expires_field], use_bin_type=True)
    return packed


def _is_finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _certificate_from_fields(fields: Any) -> Certificate:
    """A ``Certificate`` from its decoded msgpack map, checking every field's type and size."""
    expected = {"swarm", "peer", "issued", "expires", "sig"}
    if not isinstance(fields, dict) or set(fields) != expected:
        raise CertificateError("malformed", f"a certificate is a map with keys {sorted(expected)}")
    public_key, peer_id, issued, expires, signature = (fields[k] for k in ("swarm", "peer", "issued", "expires", "sig"))
    if not isinstance(public_key, bytes) or len(public_key) != SWARM_PUBLIC_KEY_BYTES:
        raise CertificateError("malformed", f"swarm public key must be {SWARM_PUBLIC_KEY_BYTES} bytes")
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise CertificateError("malformed", "peer id must be a short string")
    if not _is_finite_number(issued):
        raise CertificateError("malformed", "issued must be a finite number")
    if expires is not None and (not _is_finite_number(expires) or expires <= issued):
        raise CertificateError("malformed", "expires must be nil or a finite number after issued")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise CertificateError("malformed", f"signature must be {SIGNATURE_BYTES} bytes")
    return Certificate(
        public_key, peer_id, float(issued), None if expires is None else float(expires), bytes(signature)
    )


def issue_certificate(
    swarm_key: Ed25519PrivateKey, peer_id: str, valid_s: float | None, now: float | None = None
) -> bytes:
    """A certificate (``Certificate.to_bytes``) admitting ``peer_id`` to the swarm of ``swarm_key``.

    ``valid_s`` is the lifetime in seconds from ``now`` (default: the current time), or None for a
    certificate that never expires. Raises ``IdentityError`` for a peer id that is not a canonical Ed25519
    peer id and ``ValueError`` for a lifetime that is not a positive finite number.
    """
    public_key_from_peer_id(peer_id)
    if valid_s is not None and not (_is_finite_number(valid_s) and valid_s > 0):
        raise ValueError(f"certificate lifetime must be a positive number of seconds, not {valid_s!r}")
    issued = float(time.time() if now is None else now)
    expires = None if valid_s is None else issued + float(valid_s)
    public_key = swarm_public_key(swarm_key)
    signature = swarm_key.sign(_certificate_signed_bytes(public_key, peer_id, issued, expires))
    return Certificate(public_key, peer_id, issued, expires, signature).to_bytes()


def _utc(seconds: float) -> str:
    """``seconds`` since the epoch as an ISO 8601 UTC time, to the second."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_text(cert_bytes: bytes) -> str:
    """The file form of a certificate: readable ``#`` comment lines, then base64 between BEGIN/END lines.

    Raises ``CertificateError("malformed")`` if ``cert_bytes`` is not a certificate.
    """
    cert = Certificate.from_bytes(cert_bytes)
    encoded = base64.b64encode(cert.to_bytes()).decode("ascii")
    body = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    header = [
        "# hexgen swarm membership certificate",
        f"# swarm:   {cert.swarm_id}",
        f"# peer:    {cert.peer_id}",
        f"# issued:  {_utc(cert.issued)}",
        f"# expires: {'never' if cert.expires is None else _utc(cert.expires)}",
    ]
    return "\n".join([*header, CERT_BEGIN, *body, CERT_END]) + "\n"


def write_certificate(path: Path, cert_bytes: bytes, *, force: bool = False) -> None:
    """Write a certificate to ``path`` in its file form (``certificate_text``).

    A certificate is not secret, but it is written like a key (all or nothing, 0600) so a half-written
    file never exists. Raises ``KeyFileExists`` if ``path`` exists and ``force`` is false, ``IdentityError``
    if it cannot be written, ``CertificateError`` if ``cert_bytes`` is not a certificate.
    """
    write_private_file(path, certificate_text(cert_bytes).encode("ascii"), replace=force)


def parse_certificate_text(text: str) -> Certificate:
    """The certificate in ``text`` (the file form); ``CertificateError("malformed")`` if there is none."""
    lines = [line.strip() for line in text.splitlines()]
    if CERT_BEGIN not in lines or CERT_END not in lines:
        raise CertificateError("malformed", f"no {CERT_BEGIN} ... {CERT_END} block")
    begin = lines.index(CERT_BEGIN)
    end = lines.index(CERT_END)
    if end <= begin:
        raise CertificateError("malformed", "the END line comes before the BEGIN line")
    try:
        data = base64.b64decode("".join(lines[begin + 1 : end]), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("malformed", "the certificate block is not base64") from None
    return Certificate.from_bytes(data)


def load_certificate(path: Path) -> Certificate:
    """The certificate stored in ``path`` (signature not checked: see ``verify_certificate``).

    Raises ``CertificateError`` naming the file: ``unreadable`` for file problems, ``malformed`` for
    content that is not a certificate.
    """
    try:
        data, _ = read_small_file(path, "certificate file")
    except IdentityError as exc:
        raise CertificateError("unreadable", str(exc)) from None
    try:
        return parse_certificate_text(data.decode("ascii"))
    except UnicodeDecodeError:
        raise CertificateError("malformed", f"certificate file {path} is not text") from None
    except CertificateError as exc:
        raise CertificateError(exc.reason, f"certificate file {path}: {exc.message}") from None


def verify_certificate(
    cert: bytes | Certificate, expected_swarm_public_key: bytes, peer_id: str, now: float
) -> Certificate:
    """The certificate, if it admits ``peer_id`` to the swarm whose public key is given, at time ``now``.

    Checks, in order: it parses (``malformed``), it names this swarm (``other-swarm``) and this peer
    (``other-peer``), the swarm key signed it (``bad-signature``), it has not expired (``expired``). There
    is no not-yet-valid check: a certificate is only ever issued by the swarm's own key, and the issuing
    machine's clock may run ahead of ours. Raises ``CertificateError(reason, message)``.
    """
    if not isinstance(cert, Certificate):
        cert = Certificate.from_bytes(cert)
    if cert.swarm_public_key != expected_swarm_public_key:
        raise CertificateError(
            "other-swarm", f"certificate is for swarm {cert.swarm_id}, not {swarm_id(expected_swarm_public_key)}"
        )
    if cert.peer_id != peer_id:
        raise CertificateError("other-peer", f"certificate is for peer {cert.peer_id}, not {peer_id}")
    try:
        Ed25519PublicKey.from_public_bytes(cert.swarm_public_key).verify(cert.signature, cert.signed_bytes())
    except (InvalidSignature, ValueError):
        raise CertificateError("bad-signature", f"certificate for {peer_id} is not signed by its swarm key") from None
    if cert.expires is not None and now >= cert.expires:
        raise CertificateError("expired", f"certificate for {peer_id} expired at {_utc(cert.expires)}")
    return cert
