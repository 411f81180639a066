"""Makes ``hexgen`` importable from a plain checkout (the device machine's copy is not an installed package).

Importing this module installs, when ``hexgen.engine`` does not import, a temporary ``hexgen`` package of
symlinks to the repository's engine, coordinator, daemon and test support, on ``sys.path`` and on
``PYTHONPATH`` (for child processes). Import it before any ``hexgen`` module.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = (("engine", "engine"), ("coordinator", "coordinator"), ("daemon", "daemon"), ("testing", "tests/support"))


def install(probe: str = "hexgen.engine") -> None:
    """Expose the checkout as ``hexgen`` unless ``probe`` already imports."""
    try:
        importlib.import_module(probe)
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="hexgen-shim-")) / "hexgen"
    shim.mkdir()
    for name, where in PARTS:
        (shim / name).symlink_to(ROOT / where)
    sys.path.insert(0, str(shim.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim.parent), os.environ.get("PYTHONPATH")) if p)
    importlib.import_module(probe)


install()
