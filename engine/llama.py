"""The Llama family: grouped-query attention, RoPE (with Llama 3 / linear scaling), RMSNorm, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.engine.attention import Attention, AttentionMetadata
from hexgen.engine.config import ModelConfig
from hexgen.engine.layers import (
    Linear,
    Piece,
    RMSNorm,
    Rotary,
    Shard,
    VocabEmbedding,
    VocabHead,
    apply_rotary,
    cols,
    rows,
)
from hexgen.engine.layout import head_range, kv_head_range
from hexgen.engine.stage import StageModel


class LlamaLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__()
        c, d = config, config.head_dim
        self.heads = head_range(c.num_heads, shard.tp_size, shard.tp_rank)
        self.kv_heads = kv_head_range(c.num_kv_heads, shard.tp_size, shard.tp_rank)
        self.ffn = shard.part(c.intermediate_size, "intermediate_size")
        n_q, n_kv = self.heads[1] - self.heads[0], self.kv_heads[1] - self.kv_heads[0]
        self.split = [n_q * d, n_kv * d, n_kv * d]
        n_ffn = self.ffn[1] - self.ffn[0]
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.qkv_proj = Linear(shard, c.hidden_size, sum(self.split), c.attention_bias)
        self.o_proj = Linear(shard, n_q * d, c.hidden_size, c.attention_bias, reduce=True)
        self.attn = Attention(n_q, n_kv, d, d**-0.5)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.gate_up_proj = Linear(shard, c.hidden_size, 2 * n_ffn, c.mlp_bias)
        self.down_proj = Linear(shard, n_ffn, c.hidden_size, c.mlp_bias, reduce=True)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        n, d = x.shape[0], self.attn.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        q_and_k = apply_rotary(qkv[:, : self.split[0] + self.split[1]].view(n, -1, d), *rope)
        q, k = torch.split(q_and_k, [self.attn.num_heads, self.attn.num_kv_heads], dim=1)
        v = qkv[:, self.split[0] + self.split[1] :].view(n, -1, d)
        x = x + self.o_proj(self.attn(q, k, v, meta))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def weight_plan(self, prefix: str, head_dim: int) -> dict[str, list[Piece]]:
        q = (self.heads[0] * head_dim, self.heads[1] * head_dim)
        kv = (self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim)
        a = f"{prefix}.self_attn"
        plan = {
            "input_layernorm.weight": [Piece(f"{prefix}.input_layernorm.weight")],
            "post_attention_layernorm.weight": [Piece(f"{prefix}.post_attention_layernorm.weight")],
            "qkv_proj.weight": [
                rows(f"{a}.q_proj.weight", q),
                rows(f"{a}.k_proj.weight", kv),
                rows(f"{a}.v_proj.weight", kv),
            ],
            "o_proj.weight": [cols(f"{a}.o_proj.weight", q)],
            "gate_up_proj.weight": [
                rows(f"{prefix}.mlp.gate_proj.weight", self.ffn),
                rows(f"{prefix}.mlp.up_proj.weight", self.ffn),
            ],
            "down_proj.weight": [cols(f"{prefix}.mlp.down_proj.weight", self.ffn)],
        }
        if self.qkv_proj.bias is not None:
            plan["qkv_proj.bias"] = [
                rows(f"{a}.q_proj.bias", q),
                rows(f"{a}.k_proj.bias", kv),
                rows(f"{a}.v_proj.bias", kv),
            ]
            plan["o_proj.bias"] = [Piece(f"{a}.o_proj.bias")]
        if self.gate_up_proj.bias is not None:
            m = f"{prefix}.mlp"
            plan["gate_up_proj.bias"] = [rows(f"{m}.gate_proj.bias", self.ffn), rows(f"{m}.up_proj.bias", self.ffn)]
            plan["down_proj.bias"] = [Piece(f"{m}.down_proj.bias")]
        return plan


class LlamaModel(StageModel):
    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__(config, shard)
        c = config
        if shard.is_first or (shard.is_last and c.tie_word_embeddings):
            self.embed_tokens = VocabEmbedding(shard, c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c, shard) for _ in shard.layers)
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)
        if shard.is_last:
            self.norm = RMSNorm(c.hidden_size, c.norm_eps)
            tied = self.embed_tokens if c.tie_word_embeddings else None
            self.head = VocabHead(shard, c.vocab_size, c.hidden_size, tied)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None  # the first stage holds the embedding
        return self.embed_tokens(input_ids)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.tables(positions, int(positions.max()), dtype)

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def weight_plan(self) -> dict[str, list[Piece]]:
        plan: dict[str, list[Piece]] = {}
        if self.embed_tokens is not None:
            plan["embed_tokens.weight"] = [self.embed_tokens.piece("model.embed_tokens.weight")]
        for i, layer in zip(self.shard.layers, self.layers, strict=True):
            assert isinstance(layer, LlamaLayer)
            for name, pieces in layer.weight_plan(f"model.layers.{i}", self.config.head_dim).items():
                plan[f"layers.{i - self.shard.start_layer}.{name}"] = pieces
        if self.shard.is_last:
            plan["norm.weight"] = [Piece("model.norm.weight")]
            if self.head is not None and self.head.weight is not None:
                plan["head.weight"] = [self.head.piece("lm_head.weight")]
        return plan
