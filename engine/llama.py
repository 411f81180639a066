"""The Llama-style decoder and its families: Llama, Mistral, Mixtral, Qwen2/2.5, Qwen3, Phi-3, Gemma, Gemma 2.

Every family is grouped-query attention with RoPE, RMSNorm and a gated MLP; ModelConfig names what sets
each apart (q/k/v bias, q/k norms, sliding windows, soft-capping, Gemma's norms and scaled embeddings, a
mixture of experts), and the checkpoint names differ only for Phi-3's fused projections and Mixtral's experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    TensorMap,
    VocabEmbedding,
    VocabHead,
    apply_rotary,
    cols,
    rows,
)
from hexgen.engine.layout import head_range, kv_head_range
from hexgen.engine.moe import SparseMoE
from hexgen.engine.stage import StageModel

Rope = tuple[torch.Tensor, torch.Tensor]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The gate activation of ModelConfig.hidden_act: silu, gelu or gelu_tanh."""
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class GatedMLP(TensorMap):
    """down(act(gate(x)) * up(x)), gate and up fused and split by columns over TP ranks, down row-parallel."""

    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.ffn = shard.part(config.intermediate_size, "intermediate_size")
        n = self.ffn[1] - self.ffn[0]
        self.gate_up_proj = Linear(shard, config.hidden_size, 2 * n, config.mlp_bias)
        self.down_proj = Linear(shard, n, config.hidden_size, config.mlp_bias, reduce=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(activation(self.act, gate) * up)

    def weight_plan(self, prefix: str, config: ModelConfig) -> dict[str, list[Piece]]:
        m = f"{prefix}.mlp"
        gate_up = [rows(f"{m}.gate_proj.weight", self.ffn), rows(f"{m}.up_proj.weight", self.ffn)]
        if config.arch == "phi3":  # gate and up stacked in one tensor
            size, (a, b) = config.intermediate_size, self.ffn
            gate_up = [rows(f"{m}.gate_up_proj.weight", span) for span in ((a, b), (size + a, size + b))]
        plan = {"gate_up_proj.weight": gate_up, "down_proj.weight": [cols(f"{m}.down_proj.weight", self.ffn)]}
        if self.gate_up_proj.bias is not None:
            plan["gate_up_proj.bias"] = [rows(f"{m}.gate_proj.bias", self.ffn), rows(f"{m}.up_proj.bias", self.ffn)]
            plan["down_proj.bias"] = [Piece(f"{m}.down_proj.bias")]
        return plan


class SelfAttention(nn.Module):
    """q/k/v projections (optionally biased, optionally q/k RMSNorm per head), RoPE, paged attention, o_proj."""

    def __init__(self, config: ModelConfig, shard: Shard, layer: int) -> None:
        super().__init__()
        c, d = config, config.head_dim
        self.heads = head_range(c.num_heads, shard.tp_size, shard.tp_rank)
        self.kv_heads = kv_head_range(c.num_kv_heads, shard.tp_size, shard.tp_rank)
        n_q, n_kv = self.heads[1] - self.heads[0], self.kv_heads[1] - self.kv_heads[0]
        self.split = [n_q * d, n_kv * d, n_kv * d]
        self.qkv_proj = Linear(shard, c.hidden_size, sum(self.split), c.attention_bias)
        self.o_proj = Linear(shard, n_q * d, c.hidden_size, c.o_bias, reduce=True)
        self.q_norm = RMSNorm(d, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(d, c.norm_eps) if c.qk_norm else None
        scale = c.attn_scale or d**-0.5
        self.attn = Attention(n_q, n_kv, d, scale, c.window(layer), c.attn_softcap)

    if TYPE_CHECKING:

        def __call__(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata) -> torch.Tensor:
        n, d = x.shape[0], self.attn.head_dim
        q, k, v = (t.view(n, -1, d) for t in torch.split(self.qkv_proj(x), self.split, dim=-1))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.o_proj(self.attn(q, k, v, meta))

    def weight_plan(self, prefix: str, config: ModelConfig) -> dict[str, list[Piece]]:
        d, a = config.head_dim, f"{prefix}.self_attn"
        q = (self.heads[0] * d, self.heads[1] * d)
        kv = (self.kv_heads[0] * d, self.kv_heads[1] * d)
        names = [f"{a}.{p}_proj" for p in "qkv"]
        spans = [q, kv, kv]
        if config.arch == "phi3":  # q, k and v stacked in one tensor
            k_at, v_at = config.num_heads * d, (config.num_heads + config.num_kv_heads) * d
            names = [f"{a}.qkv_proj"] * 3
            spans = [q, (k_at + kv[0], k_at + kv[1]), (v_at + kv[0], v_at + kv[1])]
        plan = {
            "qkv_proj.weight": [rows(f"{name}.weight", span) for name, span in zip(names, spans, strict=True)],
            "o_proj.weight": [cols(f"{a}.o_proj.weight", q)],
        }
        if self.qkv_proj.bias is not None:
            plan["qkv_proj.bias"] = [rows(f"{name}.bias", span) for name, span in zip(names, spans, strict=True)]
        if self.o_proj.bias is not None:
            plan["o_proj.bias"] = [Piece(f"{a}.o_proj.bias")]
        if self.q_norm is not None:
            plan["q_norm.weight"] = [Piece(f"{a}.q_norm.weight")]
            plan["k_norm.weight"] = [Piece(f"{a}.k_norm.weight")]
        return plan


class LlamaLayer(nn.Module):
    """Pre-norm attention and MLP blocks; Gemma 2 also norms each block's output before the residual."""

    def __init__(self, config: ModelConfig, shard: Shard, layer: int) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)
        self.self_attn = SelfAttention(c, shard, layer)
        self.attn = self.self_attn.attn  # the runner hands each layer's ``attn`` its KV cache
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)
        self.norms = ["input_layernorm", "post_attention_layernorm"]
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)
            self.norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        self.mlp: GatedMLP | SparseMoE = SparseMoE(c, shard) if c.num_experts else GatedMLP(c, shard)

    def forward(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, meta)
        if len(self.norms) == 2:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def weight_plan(self, prefix: str, config: ModelConfig) -> dict[str, list[Piece]]:
        plan = {f"{norm}.weight": [Piece(f"{prefix}.{norm}.weight")] for norm in self.norms}
        for part, pieces in (
            ("self_attn", self.self_attn.weight_plan(prefix, config)),
            ("mlp", self.mlp.weight_plan(prefix, config)),
        ):
            plan |= {f"{part}.{name}": p for name, p in pieces.items()}
        return plan


def token_lengths(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """The length this step gives the sequence of each of its tokens: [N]. O(N)."""
    repeats = torch.tensor(meta.query_lens, device=device)
    return torch.repeat_interleave(torch.tensor(meta.context_lens, device=device), repeats)


class LlamaModel(StageModel):
    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__(config, shard)
        c = config
        if shard.is_first or (shard.is_last and c.tie_word_embeddings):
            self.embed_tokens = VocabEmbedding(shard, c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c, shard, i) for i in shard.layers)
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)
        if shard.is_last:
            self.norm = RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)
            tied = self.embed_tokens if c.tie_word_embeddings else None
            self.head = VocabHead(shard, c.vocab_size, c.hidden_size, tied)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None  # the first stage holds the embedding
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:  # Gemma: by sqrt(hidden_size), rounded to the model's dtype first
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """As StageModel's, with each token's sequence length handed to RoPE (dynamic scaling needs it)."""
        x = self.embed(inputs, positions) if self.shard.is_first else inputs
        lengths = token_lengths(meta, positions.device) if self.rotary.trained else None
        top = meta.max_position or int(positions.max())  # the runner knows it on the host: no device sync
        rope = self.rotary.tables(positions, top, x.dtype, lengths)
        for layer in self.layers:
            x = layer(x, rope, meta)
        return x

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().logits(hidden)
        cap = self.config.logit_softcap
        return logits if logits is None or not cap else torch.tanh(logits / cap) * cap

    def weight_plan(self) -> dict[str, list[Piece]]:
        plan: dict[str, list[Piece]] = {}
        if self.embed_tokens is not None:
            plan["embed_tokens.weight"] = [self.embed_tokens.piece("model.embed_tokens.weight")]
        for i, layer in zip(self.shard.layers, self.layers, strict=True):
            assert isinstance(layer, LlamaLayer)
            for name, pieces in layer.weight_plan(f"model.layers.{i}", self.config).items():
                plan[f"layers.{i - self.shard.start_layer}.{name}"] = pieces
        if self.shard.is_last:
            plan["norm.weight"] = [Piece("model.norm.weight")]
            if self.head is not None and self.head.weight is not None:
                plan["head.weight"] = [self.head.piece("lm_head.weight")]
        return plan
