"""What model a daemon serves: a Hugging Face checkpoint directory, and a fingerprint every node compares.

The fingerprint hashes ``config.json``, the tokenizer files and, for each weight file, its name, size and its
first and last MiB: enough to tell different checkpoints apart without reading tens of gigabytes at every start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hexgen.engine.hub import SERVED_FILES

SAMPLE_BYTES = 1 << 20


class ModelFilesError(ValueError):
    """The directory is not a servable checkpoint."""


def is_checkpoint_dir(model: str) -> bool:
    return Path(model).is_dir()


def model_fingerprint(model_dir: str | Path) -> str:
    """Hex digest over every small file the model is served from (config.json, the tokenizer's, the index:
    ``engine.hub.SERVED_FILES``) and the weight files' names, sizes and first and last MiB. Two revisions of a
    Hub model that serve different files differ (but for a weight edit keeping a file's size and both ends); a
    Hub snapshot and a copy of its files do not. O(files)."""
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise ModelFilesError(f"{root} has no config.json")
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise ModelFilesError(f"{root} has no *.safetensors weights")
    digest = hashlib.sha256()
    for name in SERVED_FILES:
        if (root / name).is_file():
            digest.update(f"{name}:{hashlib.sha256((root / name).read_bytes()).hexdigest()}".encode())
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()
