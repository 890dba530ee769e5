"""Tiny random Hugging Face models for tests (built with transformers / torch, saved to disk)."""

from __future__ import annotations

from pathlib import Path

TINY_LLAMA = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def make_tiny_hf_model(out_dir: Path, kind: str = "llama_gqa", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model. kinds: llama_gqa (untied), llama3_tied (rope llama3, tied),
    mistral_window (sliding window 6)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kw = dict(TINY_LLAMA)
    if kind == "llama_gqa":
        cfg, cls = LlamaConfig(**{**kw, **overrides}), LlamaForCausalLM
    elif kind == "llama3_tied":
        kw.update(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        cfg, cls = LlamaConfig(**{**kw, **overrides}), LlamaForCausalLM
    elif kind == "mistral_window":
        kw.update(sliding_window=6)
        cfg, cls = MistralConfig(**{**kw, **overrides}), MistralForCausalLM
    else:
        raise ValueError(kind)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and some weights tiny: randomise for a real test
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
