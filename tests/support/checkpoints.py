"""Tiny random-weight checkpoints of every supported family written by transformers, and its greedy output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LLAMA_GQA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 251,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}
SMALL = {"vocab_size": 251, "max_position_embeddings": 256, "hidden_size": 64, "intermediate_size": 96}
SMALL |= {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
WINDOW = 8  # tokens: the tests' prompts and generations run past it
# one per family the engine runs beside Llama and OPT, apart from TINY_CONFIGS (which every session that
# asks for tiny_models writes): tests/test_engine_families.py writes and runs them all
NEW_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2": {  # q/k/v bias, sliding windows on the last two layers, yarn past 16 positions
        **SMALL,
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": WINDOW,
        "max_window_layers": 2,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    },
    "qwen3": {  # q/k norms, explicit head_dim, dynamic NTK rope past 16 positions
        **SMALL,
        "model_type": "qwen3",
        "head_dim": 32,
        "tie_word_embeddings": True,
        "max_position_embeddings": 16,
        "rope_theta": 100.0,
        "rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
    },
    "mistral": {**SMALL, "model_type": "mistral", "sliding_window": WINDOW},
    "phi3": {**SMALL, "model_type": "phi3", "sliding_window": WINDOW},
    "gemma": {**SMALL, "model_type": "gemma", "num_key_value_heads": 1, "head_dim": 32},
    "gemma2": {
        **SMALL,
        "model_type": "gemma2",
        "head_dim": 16,
        "sliding_window": WINDOW,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
    },
    "mixtral": {**SMALL, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-gqa": LLAMA_GQA,
    "llama3-rope": {
        **LLAMA_GQA,
        "num_key_value_heads": 2,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        "attention_bias": True,
    },
    "opt": {
        "model_type": "opt",
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 251,
        "max_position_embeddings": 256,
        "word_embed_proj_dim": 64,
        "do_layer_norm_before": True,
    },
    "opt-postnorm-proj": {
        "model_type": "opt",
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 251,
        "max_position_embeddings": 256,
        "word_embed_proj_dim": 32,
        "do_layer_norm_before": False,
    },
}


def save_random_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """Build the named config with random weights (std 0.1 so logits are not flat) and save it."""
    import transformers

    spec = dict({**TINY_CONFIGS, **NEW_FAMILIES}[name])
    model_type = spec.pop("model_type")
    config = transformers.AutoConfig.for_model(
        model_type, **spec, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.normal_(0.0, 0.1 if param.dim() > 1 else 0.02)
            if param.dim() == 1 and (param.shape[0] == config.hidden_size or "norm" in param_name):
                param.add_(1.0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def reference_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def random_prompts(count: int, vocab: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
