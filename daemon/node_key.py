"""A node's key: its libp2p Ed25519 key pair, the key file, its peer id and its signatures.

The key file holds the libp2p protobuf private-key format (what ``libp2p.identity_utils.save_identity``
writes), mode 0600; a peer id is the base58 identity multihash of the public key, so an Ed25519 peer id
inlines its public key and verifiers need no key directory. This is the one module besides ``host.py`` that
touches libp2p: the rest of the daemon holds a ``KeyPair`` and a ``PeerKey`` without looking inside.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from google.protobuf.message import DecodeError
from libp2p.crypto.ed25519 import Ed25519PublicKey as PeerKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair as KeyPair  # the key type the rest of the daemon holds
from libp2p.crypto.keys import KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from nacl.exceptions import CryptoError

from hexgen.daemon.private_files import (
    IdentityError,
    KeyFileExists,
    default_data_dir,
    read_private_file,
    write_private_file,
)

KEY_FILE_NAME = "node.key"
MAX_PEER_ID_CHARS = 128
# What libp2p's key decoding raises for bytes that are no key: protobuf, nacl, coincurve and key-type errors.
_CORRUPT_KEY_ERRORS = (DecodeError, BaseLibp2pError, ValueError, TypeError, RuntimeError)


def default_key_file() -> Path:
    """Where a node keeps its key unless told otherwise: ``default_data_dir() / "node.key"``."""
    return default_data_dir() / KEY_FILE_NAME


def new_key_pair(seed: bytes | None = None) -> KeyPair:
    """A fresh Ed25519 key pair (from the 32-byte ``seed`` when given: the same seed, the same key)."""
    return create_new_key_pair(seed)


def create_key_file(path: Path, *, force: bool = False) -> KeyPair:
    """Generate a new Ed25519 node key and write it to ``path`` (mode 0600, parents 0700).

    Raises ``KeyFileExists`` if ``path`` exists and ``force`` is false (with ``force`` the old key is
    replaced atomically), and ``IdentityError`` if the file cannot be written.
    """
    key_pair = create_new_key_pair()
    write_private_file(path, key_pair.private_key.serialize(), replace=force)
    return key_pair


def load_key(path: Path) -> KeyPair:
    """The Ed25519 key pair stored in ``path``.

    Raises ``IdentityError`` naming the file if it is missing, unreadable, accessible to other users,
    corrupt, or holds a key of another type.
    """
    data = read_private_file(path, "key file")
    try:
        private_key = deserialize_private_key(data)
        public_key = private_key.get_public_key()
    except _CORRUPT_KEY_ERRORS as exc:
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
    return str(ID.from_pubkey(key_pair.public_key).to_base58())


def is_ed25519(key_pair: KeyPair) -> bool:
    """Whether ``key_pair`` is an Ed25519 pair, the only kind hexgen signs with."""
    return bool(key_pair.private_key.get_type() == KeyType.Ed25519)


def sign(key_pair: KeyPair, data: bytes) -> bytes:
    """The signature of ``data`` by ``key_pair``'s private key (64 bytes for Ed25519)."""
    return bytes(key_pair.private_key.sign(data))


def public_key_from_peer_id(peer_id: str) -> PeerKey:
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
    if not isinstance(public_key, PeerKey) or ID.from_pubkey(public_key).to_base58() != peer_id:
        raise IdentityError(f"peer id {peer_id!r} is not an Ed25519 peer id")
    return public_key


def signature_holds(public_key: PeerKey, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s valid signature over ``data``; False for any signature nacl
    cannot even parse."""
    try:
        return bool(public_key.verify(data, signature))
    except (CryptoError, ValueError, TypeError):
        return False
