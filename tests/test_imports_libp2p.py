"""libp2p stays behind a few modules: only daemon/host.py (the network), daemon/node_key.py (keys, peer ids),
daemon/relay.py and daemon/nat_check.py (circuit relay v2 and AutoNAT, whose messages are the library's) import
libp2p or multiaddr; every other module of daemon/ and cli/ speaks through their names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("daemon", "cli")
ALLOWED = {"daemon/host.py", "daemon/node_key.py", "daemon/relay.py", "daemon/nat_check.py"}
LIBRARIES = ("libp2p", "multiaddr")


def _is_library(name: str) -> bool:
    return any(name == lib or name.startswith(f"{lib}.") for lib in LIBRARIES)


def library_imports(tree: ast.AST) -> list[str]:
    """``line: module`` of each libp2p or multiaddr import anywhere in ``tree`` (function bodies included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: {alias.name}" for alias in node.names if _is_library(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_library(node.module):
            found.append(f"{node.lineno}: {node.module}")
    return sorted(found, key=lambda entry: int(entry.split(":")[0]))


def test_library_imports_are_found() -> None:
    tree = ast.parse("import os\ndef f():\n    from libp2p.peer.id import ID\nimport multiaddr.codecs\n")
    assert library_imports(tree) == ["3: libp2p.peer.id", "4: multiaddr.codecs"]


def test_only_host_and_node_key_import_libp2p() -> None:
    offenders = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            found = library_imports(ast.parse(path.read_text(), filename=relative))
            if found and relative not in ALLOWED:
                offenders[relative] = found
    assert not offenders, f"import libp2p through daemon/host.py or daemon/node_key.py instead: {offenders}"
