"""Shared fixtures: tiny Hugging Face checkpoints (random weights) and the real stories260K model."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"the stories260K fixture is absent ({STORIES}); it lives in ../shared beside the repository")
    return STORIES


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight checkpoints saved by transformers: name -> directory."""
    from hexgen.testing.checkpoints import TINY_CONFIGS, save_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_random_checkpoint(name, root / name) for name in TINY_CONFIGS}
