"""A sparse mixture of experts (Mixtral): a router picks the top-k experts of each token, whose gated MLPs
are mixed by the renormalised router weights. Experts are split whole over the TP ranks."""

from __future__ import annotations

import torch
from torch import nn

from hexgen.engine.config import ModelConfig
from hexgen.engine.layers import Linear, Piece, Shard, TensorMap


class Expert(TensorMap):
    """One expert's gated MLP, held whole on one rank: w2(silu(w1 x) * w3 x)."""

    def __init__(self, shard: Shard, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(shard, hidden, 2 * ffn, False)
        self.down_proj = Linear(shard, ffn, hidden, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class SparseMoE(TensorMap):
    """The experts [first, end) of this TP rank and a full copy of the router; each rank adds what its
    experts contribute and the ranks' parts are all-reduced. Per token O(k * expert MLP) on the owning ranks."""

    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.top_k = config.experts_per_token
        self.first, self.end = shard.part(config.num_experts, "num_local_experts")
        self.gate = Linear(Shard(0, 1, 1), config.hidden_size, config.num_experts, False)
        self.experts = nn.ModuleList(
            Expert(shard, config.hidden_size, config.intermediate_size) for _ in range(self.first, self.end)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts [N, k] and their weights [N, k] (float32, summing to 1)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen, weights = self.route(x)
        out = torch.zeros_like(x)
        for index, expert in zip(range(self.first, self.end), self.experts, strict=True):
            tokens, slot = torch.where(chosen == index)
            if tokens.numel():
                part = expert(x[tokens]) * weights[tokens, slot, None]
                out.index_add_(0, tokens, part.to(out.dtype))
        return self.shard.all_reduce(out)

    def weight_plan(self, prefix: str, config: ModelConfig) -> dict[str, list[Piece]]:
        m = f"{prefix}.block_sparse_moe"
        plan = {"gate.weight": [Piece(f"{m}.gate.weight")]}
        for local, index in enumerate(range(self.first, self.end)):
            e = f"{m}.experts.{index}"
            plan[f"experts.{local}.gate_up_proj.weight"] = [Piece(f"{e}.w1.weight"), Piece(f"{e}.w3.weight")]
            plan[f"experts.{local}.down_proj.weight"] = [Piece(f"{e}.w2.weight")]
        return plan
