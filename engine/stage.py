"""The stage model: the common skeleton of a decoder-only family, which each family module fills in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hexgen.engine.attention import AttentionMetadata
from hexgen.engine.config import ModelConfig
from hexgen.engine.layers import Piece, Shard, VocabEmbedding, VocabHead


class StageModel(nn.Module):
    """Layers [shard.start_layer, shard.end_layer) of one family; the first stage embeds, the last stage
    applies the final norm and the head. Subclasses define ``embed``, ``prepare``, ``final`` and the
    checkpoint names in ``weight_plan``."""

    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__()
        self.config = config
        self.shard = shard
        self.embed_tokens: VocabEmbedding | None = None
        self.head: VocabHead | None = None
        self.layers = nn.ModuleList()

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """Per-step values every layer shares (RoPE tables), computed once."""
        return None

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_plan(self) -> dict[str, list[Piece]]:
        """For each parameter of this module, the checkpoint pieces concatenated (dim 0) to fill it."""
        raise NotImplementedError

    if TYPE_CHECKING:

        def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """inputs: token ids [N] on the first stage, hidden states [N, hidden] elsewhere."""
        x = self.embed(inputs, positions) if self.shard.is_first else inputs
        shared = self.prepare(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, shared, meta)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, vocab] for the given last-position hidden states; None on TP ranks other than 0."""
        assert self.head is not None
        return self.head(self.final(hidden))
