"""Tiny random decoder-only models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

#: model_type -> extra config fields that exercise what makes the family different.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    "qwen3": {"head_dim": 8},
    "gemma2": {
        "head_dim": 8,
        "sliding_window": 8,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "query_pre_attn_scalar": 8,
    },
    "gemma3_text": {
        "head_dim": 8,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 8,
    },
    "phi3": {},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 4.0,
        "attention_multiplier": 0.3,
    },
}


def tiny_model(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A float32 random model of ``model_type`` in eval mode, with eager-free default attention."""
    fields = {**COMMON, **FAMILIES[model_type], **overrides}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()
