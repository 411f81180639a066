"""Node identity and private-swarm membership: the node's Ed25519 key file, swarm keys and certificates.

A node's identity is a libp2p Ed25519 key pair kept in a file (the libp2p protobuf private-key format that
``libp2p.identity_utils.save_identity`` writes), mode 0600; its peer id is the base58 identity multihash of
the public key. A private swarm has its own Ed25519 swarm key (PKCS#8 PEM, mode 0600) held by whoever
admits nodes; a membership certificate is the swarm key's signature over (swarm public key, peer id,
issued, expires). Certificates travel as msgpack bytes (``Certificate.to_bytes``) and are stored in files
as base64 between BEGIN/END lines, after a few ``#`` comment lines a person can read.

Every file problem surfaces as ``IdentityError`` (or ``CertificateError`` for certificates) with a
one-line message that names the file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import math
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

KEY_FILE_NAME = "node.key"
SWARM_KEY_FILE_NAME = "swarm.key"
CERT_DOMAIN = b"hexgen/swarm-cert/1"
CERT_BEGIN = "-----BEGIN HEXGEN SWARM CERTIFICATE-----"
CERT_END = "-----END HEXGEN SWARM CERTIFICATE-----"
# Real key and certificate files are a few hundred bytes; the cap keeps a wrong path (a log, /dev/zero)
# from being read whole.
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_PEER_ID_CHARS = 128
SWARM_PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    """A key file that cannot be read, written or trusted, or a bad peer id; the message names the cause."""


class KeyFileExists(IdentityError):
    """Creating a key file was refused because the file is already there."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists")
        self.path = path


class CertificateError(Exception):
    """A membership certificate that does not admit the peer; ``reason`` is a short code.

    Codes: ``malformed``, ``unreadable`` (file), ``other-swarm``, ``other-peer``, ``bad-signature``,
    ``expired``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------------------
# Files


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/hexgen``, or ``~/.local/share/hexgen``.

    A relative ``$XDG_DATA_HOME`` is ignored, as the XDG base-directory specification asks.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "hexgen"


def default_key_file() -> Path:
    """Where a node keeps its key unless told otherwise: ``default_data_dir() / "node.key"``."""
    return default_data_dir() / KEY_FILE_NAME


def default_swarm_key_file() -> Path:
    """Where ``hexgen-node swarm-key`` writes unless told otherwise: ``default_data_dir() / "swarm.key"``."""
    return default_data_dir() / SWARM_KEY_FILE_NAME


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and any missing parents with mode 0700; existing folders are left as they are."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def _write_private_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600, all or nothing.

    The bytes go to a temporary file in the same folder first, so a crash or a concurrent reader never
    sees half a key. With ``replace`` the temporary file replaces ``path`` atomically; without it the
    file is hard-linked into place, which fails with ``KeyFileExists`` if ``path`` appeared meanwhile.
    Raises ``IdentityError`` for other file-system failures.
    """
    try:
        _make_private_dirs(path.parent)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        try:
            # mkstemp already creates 0600; the chmod holds even under an unusual umask or ACL default.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if replace:
                os.replace(temp_name, path)
            else:
                _link_exclusively(Path(temp_name), path, data)
        except FileExistsError:
            raise KeyFileExists(path) from None
        except IsADirectoryError:
            raise IdentityError(f"cannot write {path}: it is a directory") from None
        except OSError as exc:
            raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)


def _link_exclusively(temp: Path, path: Path, data: bytes) -> None:
    """Put ``temp`` at ``path`` unless ``path`` exists (FileExistsError), falling back to O_EXCL."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        # Some file systems (FAT, a few FUSE mounts) have no hard links: create exclusively instead.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)


def _read_small_file(path: Path, what: str) -> tuple[bytes, int]:
    """Up to ``MAX_KEY_FILE_BYTES`` of ``path`` and its permission bits.

    ``what`` names the file in messages ("key file", "certificate file"). Raises ``IdentityError`` for a
    missing, unreadable or oversized file.
    """
    try:
        with open(path, "rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise IdentityError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{what} {path} is too large to be a {what}")
    return data, mode


def _read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file, refusing one that other users may read or write (``IdentityError``)."""
    data, mode = _read_small_file(path, what)
    if os.name != "nt" and mode & 0o077:
        raise IdentityError(f"{what} {path} is accessible to other users (mode {mode:04o}); run: chmod 600 {path}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Node key


def create_key_file(path: Path, *, force: bool = False) -> KeyPair:
    """Generate a new Ed25519 node key and write it to ``path`` (mode 0600, parents 0700).

    Raises ``KeyFileExists`` if ``path`` exists and ``force`` is false (with ``force`` the old key is
    replaced atomically), and ``IdentityError`` if the file cannot be written.
    """
    key_pair = create_new_key_pair()
    _write_private_file(path, key_pair.private_key.serialize(), replace=force)
    return key_pair


def load_key(path: Path) -> KeyPair:
    """The Ed25519 key pair stored in ``path``.

    Raises ``IdentityError`` naming the file if it is missing, unreadable, accessible to other users,
    corrupt, or holds a key of another type.
    """
    data = _read_private_file(path, "key file")
    try:
        private_key = deserialize_private_key(data)
        public_key = private_key.get_public_key()
    except Exception as exc:  # protobuf, nacl and key-type errors all mean the same thing here
        raise IdentityError(f"key file {path} is corrupt: {type(exc).__name__}") from None
    if private_key.get_type() != KeyType.Ed25519:
        raise IdentityError(f"key file {path} holds a {private_key.get_type().name} key; hexgen needs Ed25519")
    return KeyPair(private_key, public_key)


def load_or_create_key(path: Path) -> KeyPair:
    """The node's key pair from ``path``, generating and saving a new one on first start.

    Two nodes starting at once with the same path end up with the same key. Raises ``IdentityError``
    (see ``load_key`` and ``create_key_file``).
    """
    if not path.exists():
        # A concurrent start may create the file between the check and the write: then load that one.
        with contextlib.suppress(KeyFileExists):
            return create_key_file(path)
    return load_key(path)


def peer_id_of(key_pair: KeyPair) -> str:
    """The base58 peer id of ``key_pair`` (for Ed25519, ``12D3KooW...``)."""
    return ID.from_pubkey(key_pair.public_key).to_base58()


def public_key_from_peer_id(peer_id: str) -> Libp2pEd25519PublicKey:
    """The Ed25519 public key inlined in ``peer_id``.

    Only the canonical base58 form is accepted (re-encoding the key must give back the same string), so
    one key has exactly one peer id. Raises ``IdentityError`` for anything else: bad base58, a hashed
    (RSA) peer id, a key of another type.
    """
    if not isinstance(peer_id, str) or not peer_id or len(peer_id) > MAX_PEER_ID_CHARS:
        raise IdentityError(f"peer id {str(peer_id)[:MAX_PEER_ID_CHARS]!r} is not an Ed25519 peer id")
    try:
        public_key = ID.from_base58(peer_id).extract_public_key()
    except ValueError:
        public_key = None
    if not isinstance(public_key, Libp2pEd25519PublicKey) or ID.from_pubkey(public_key).to_base58() != peer_id:
        raise IdentityError(f"peer id {peer_id!r} is not an Ed25519 peer id")
    return public_key


# ---------------------------------------------------------------------------------------------------------
# Swarm key


def create_swarm_key(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """Generate a swarm key and write it to ``path`` as PKCS#8 PEM (mode 0600, parents 0700).

    Raises ``KeyFileExists`` if ``path`` exists and ``force`` is false, ``IdentityError`` if it cannot be
    written.
    """
    swarm_key = Ed25519PrivateKey.generate()
    pem = swarm_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private_file(path, pem, replace=force)
    return swarm_key


def load_swarm_key(path: Path) -> Ed25519PrivateKey:
    """The swarm key stored in ``path``; ``IdentityError`` naming the file if it cannot be used."""
    data = _read_private_file(path, "swarm key file")
    try:
        swarm_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        reason = "it is password-protected" if isinstance(exc, TypeError) else "it is not a PEM private key"
        raise IdentityError(f"swarm key file {path} is unusable: {reason}") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and friends
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


# ---------------------------------------------------------------------------------------------------------
# Certificates


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
        return msgpack.packb(
            {
                "swarm": self.swarm_public_key,
                "peer": self.peer_id,
                "issued": float(self.issued),
                "expires": None if self.expires is None else float(self.expires),
                "sig": self.signature,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse ``to_bytes`` output; ``CertificateError("malformed")`` for anything else. Checks no signature."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_KEY_FILE_BYTES:
            raise CertificateError("malformed", "a certificate is a short byte string")
        try:
            fields = msgpack.unpackb(bytes(data), raw=False)
        except Exception as exc:  # msgpack signals bad input with several exception types
            raise CertificateError("malformed", f"not msgpack ({type(exc).__name__})") from None
        return _certificate_from_fields(fields)


def _certificate_signed_bytes(public_key: bytes, peer_id: str, issued: float, expires: float | None) -> bytes:
    """Canonical signed bytes of a certificate's fields (times as float64, so 5 and 5.0 sign alike)."""
    expires_field = None if expires is None else float(expires)
    return msgpack.packb([CERT_DOMAIN, public_key, peer_id, float(issued), expires_field], use_bin_type=True)


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
    _write_private_file(path, certificate_text(cert_bytes).encode("ascii"), replace=force)


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
        data, _ = _read_small_file(path, "certificate file")
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
