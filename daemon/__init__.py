"""hexgen.daemon: the trio node (libp2p host, membership, election, routing, supervision)."""
