"""The OPT family: learned positions (offset 2), LayerNorm before or after each block, ReLU MLP, projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.engine.attention import Attention, AttentionMetadata
from hexgen.engine.config import ModelConfig
from hexgen.engine.layers import LayerNorm, Linear, Piece, Shard, VocabEmbedding, VocabHead, cols, rows
from hexgen.engine.layout import head_range
from hexgen.engine.stage import StageModel

POSITION_OFFSET = 2


class OPTLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__()
        c, d = config, config.head_dim
        self.pre_norm = c.do_layer_norm_before
        self.heads = head_range(c.num_heads, shard.tp_size, shard.tp_rank)
        self.ffn = shard.part(c.intermediate_size, "ffn_dim")
        n = self.heads[1] - self.heads[0]
        self.self_attn_layer_norm = LayerNorm(c.hidden_size, c.norm_eps)
        self.qkv_proj = Linear(shard, c.hidden_size, 3 * n * d, c.attention_bias)
        self.out_proj = Linear(shard, n * d, c.hidden_size, c.attention_bias, reduce=True)
        self.attn = Attention(n, n, d, 1.0)
        self.q_scale = d**-0.5
        self.final_layer_norm = LayerNorm(c.hidden_size, c.norm_eps)
        self.fc1 = Linear(shard, c.hidden_size, self.ffn[1] - self.ffn[0], c.mlp_bias)
        self.fc2 = Linear(shard, self.ffn[1] - self.ffn[0], c.hidden_size, c.mlp_bias, reduce=True)
        self.act = F.relu if c.hidden_act == "relu" else F.gelu

    def forward(self, x: torch.Tensor, _: None, meta: AttentionMetadata) -> torch.Tensor:
        n, d = x.shape[0], self.attn.head_dim
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        q, k, v = self.qkv_proj(h).view(n, 3, -1, d).unbind(1)
        # OPT scales the query before the product, not the scores; doing the same keeps results bit-exact.
        x = x + self.out_proj(self.attn(q * self.q_scale, k, v, meta))
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)

    def weight_plan(self, prefix: str, head_dim: int) -> dict[str, list[Piece]]:
        span = (self.heads[0] * head_dim, self.heads[1] * head_dim)
        a = f"{prefix}.self_attn"
        plan = {
            "qkv_proj.weight": [rows(f"{a}.{p}_proj.weight", span) for p in "qkv"],
            "out_proj.weight": [cols(f"{a}.out_proj.weight", span)],
            "fc1.weight": [rows(f"{prefix}.fc1.weight", self.ffn)],
            "fc2.weight": [cols(f"{prefix}.fc2.weight", self.ffn)],
        }
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            plan[f"{norm}.weight"] = [Piece(f"{prefix}.{norm}.weight")]
            plan[f"{norm}.bias"] = [Piece(f"{prefix}.{norm}.bias")]
        if self.qkv_proj.bias is not None:
            plan["qkv_proj.bias"] = [rows(f"{a}.{p}_proj.bias", span) for p in "qkv"]
            plan["out_proj.bias"] = [Piece(f"{a}.out_proj.bias")]
        if self.fc1.bias is not None:
            plan["fc1.bias"] = [rows(f"{prefix}.fc1.bias", self.ffn)]
            plan["fc2.bias"] = [Piece(f"{prefix}.fc2.bias")]
        return plan


class OPTModel(StageModel):
    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__(config, shard)
        c = config
        projected = c.word_embed_proj_dim != c.hidden_size
        self.embed_tokens = VocabEmbedding(shard, c.vocab_size, c.word_embed_proj_dim)
        if shard.is_first:
            self.embed_positions = nn.Embedding(c.max_position + POSITION_OFFSET, c.hidden_size)
            self.embed_positions.weight.requires_grad_(False)
            self.project_in = Linear(shard, c.word_embed_proj_dim, c.hidden_size, False) if projected else None
        self.layers = nn.ModuleList(OPTLayer(c, shard) for _ in shard.layers)
        if shard.is_last:
            self.final_layer_norm = LayerNorm(c.hidden_size, c.norm_eps) if c.final_layer_norm else None
            self.project_out = Linear(shard, c.hidden_size, c.word_embed_proj_dim, False) if projected else None
            self.head = VocabHead(shard, c.vocab_size, c.word_embed_proj_dim, self.embed_tokens)
        elif not shard.is_first:
            self.embed_tokens = None

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None  # the first stage holds the embedding
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        positional: torch.Tensor = self.embed_positions(positions + POSITION_OFFSET)
        return x + positional

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden if self.project_out is None else self.project_out(hidden)

    def weight_plan(self) -> dict[str, list[Piece]]:
        m = "model.decoder"
        plan: dict[str, list[Piece]] = {}
        if self.embed_tokens is not None:
            plan["embed_tokens.weight"] = [self.embed_tokens.piece(f"{m}.embed_tokens.weight")]
        if self.shard.is_first:
            plan["embed_positions.weight"] = [Piece(f"{m}.embed_positions.weight")]
            if self.project_in is not None:
                plan["project_in.weight"] = [Piece(f"{m}.project_in.weight")]
        for i, layer in zip(self.shard.layers, self.layers, strict=True):
            assert isinstance(layer, OPTLayer)
            for name, pieces in layer.weight_plan(f"{m}.layers.{i}", self.config.head_dim).items():
                plan[f"layers.{i - self.shard.start_layer}.{name}"] = pieces
        if self.shard.is_last:
            if self.final_layer_norm is not None:
                plan["final_layer_norm.weight"] = [Piece(f"{m}.final_layer_norm.weight")]
                plan["final_layer_norm.bias"] = [Piece(f"{m}.final_layer_norm.bias")]
            if self.project_out is not None:
                plan["project_out.weight"] = [Piece(f"{m}.project_out.weight")]
        return plan
