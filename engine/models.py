"""The model registry: the family named in a checkpoint's config -> the stage model that runs it."""

from __future__ import annotations

from hexgen.engine.config import ModelConfig
from hexgen.engine.layers import Shard
from hexgen.engine.llama import LlamaModel
from hexgen.engine.opt import OPTModel
from hexgen.engine.stage import StageModel

FAMILIES: dict[str, type[StageModel]] = {"llama": LlamaModel, "opt": OPTModel}


def build_model(config: ModelConfig, shard: Shard) -> StageModel:
    """The stage model of ``config.family`` holding ``shard``'s layers (weights not loaded)."""
    return FAMILIES[config.family](config, shard)
