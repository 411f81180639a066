"""hexgen.cli: the hexgen-node and hexgen-client command lines."""
