"""Node identity and private-swarm membership, in one import: the node key, swarm keys and certificates.

Each part lives in its own module and is re-exported here, where the daemon and the CLI import it from:
``private_files`` (the data folder, 0600 writes, ``IdentityError``), ``node_key`` (the libp2p Ed25519 key
file, peer ids, signatures) and ``certificates`` (the swarm key and the membership certificates it signs).
"""

from __future__ import annotations

from hexgen.daemon.certificates import (
    CERT_BEGIN,
    CERT_DOMAIN,
    CERT_END,
    SIGNATURE_BYTES,
    SWARM_KEY_FILE_NAME,
    SWARM_PUBLIC_KEY_BYTES,
    Certificate,
    CertificateError,
    certificate_text,
    create_swarm_key,
    default_swarm_key_file,
    issue_certificate,
    load_certificate,
    load_swarm_key,
    parse_certificate_text,
    swarm_id,
    swarm_public_key,
    verify_certificate,
    write_certificate,
)
from hexgen.daemon.node_key import (
    KEY_FILE_NAME,
    MAX_PEER_ID_CHARS,
    KeyPair,
    PeerKey,
    create_key_file,
    default_key_file,
    load_key,
    load_or_create_key,
    new_key_pair,
    peer_id_of,
    public_key_from_peer_id,
)
from hexgen.daemon.private_files import MAX_KEY_FILE_BYTES, IdentityError, KeyFileExists, default_data_dir

__all__ = [
    "CERT_BEGIN",
    "CERT_DOMAIN",
    "CERT_END",
    "KEY_FILE_NAME",
    "MAX_KEY_FILE_BYTES",
    "MAX_PEER_ID_CHARS",
    "SIGNATURE_BYTES",
    "SWARM_KEY_FILE_NAME",
    "SWARM_PUBLIC_KEY_BYTES",
    "Certificate",
    "CertificateError",
    "IdentityError",
    "KeyFileExists",
    "KeyPair",
    "PeerKey",
    "certificate_text",
    "create_key_file",
    "create_swarm_key",
    "default_data_dir",
    "default_key_file",
    "default_swarm_key_file",
    "issue_certificate",
    "load_certificate",
    "load_key",
    "load_or_create_key",
    "load_swarm_key",
    "new_key_pair",
    "parse_certificate_text",
    "peer_id_of",
    "public_key_from_peer_id",
    "swarm_id",
    "swarm_public_key",
    "verify_certificate",
    "write_certificate",
]
