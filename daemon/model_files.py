"""What model a daemon serves: a Hugging Face checkpoint directory, and a fingerprint every node compares.

The fingerprint hashes ``config.json`` and, for each weight file, its name, size and its first and last MiB:
enough to tell different checkpoints apart without reading tens of gigabytes at every start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_BYTES = 1 << 20


class ModelFilesError(ValueError):
    """The directory is not a servable checkpoint."""


def is_checkpoint_dir(model: str) -> bool:
    return Path(model).is_dir()


def model_fingerprint(model_dir: str | Path) -> str:
    """Hex digest over config.json and the weight files' names, sizes and first and last MiB. O(files)."""
    root = Path(model_dir)
    config = root / "config.json"
    if not config.is_file():
        raise ModelFilesError(f"{root} has no config.json")
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise ModelFilesError(f"{root} has no *.safetensors weights")
    digest = hashlib.sha256(config.read_bytes())
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()
