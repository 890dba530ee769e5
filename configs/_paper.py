"""Shared paper settings (ALTER, AAAI 2026): rank 8, lr_B 1e-3, lr_A 1e-5, β = γ = 1, λ = 0.01,
batch 4, 3 epochs. Imported by the tofu_*/wmdp_*/muse_* configs."""

from ml_collections import ConfigDict


def paper_config(*, model: str, prompt_format: str, forget: str, retain: str, source: str = "locuslab/TOFU",
                 output_dir: str) -> ConfigDict:
    return ConfigDict({
        "model": {"name": model, "dtype": "bfloat16", "param_dtype": "bfloat16", "prompt_format": prompt_format,
                  "max_length": 256, "head_chunk": 16,  # LM head on scored positions, 16 at a time
                  "scan_layers": False},  # no per-step copy of the 7B/8B layer weights
        "adapter": {"rank": 8, "alpha": 16.0, "top_k": 3, "tau_high": 0.8, "tau_low": 0.01},
        "entropy": {"q": 1.0, "threshold": "fixed", "value": 1.2},
        "loss": {"beta": 1.0, "gamma": 1.0, "lambda_struct": 0.01},
        "optim": {"lr_a": 1e-5, "lr_b": 1e-3, "lr_router": 1e-2},
        "data": {"source": source, "forget_split": forget, "retain_split": retain, "max_subdomains": 4},
        "train": {"method": "alter", "epochs": 3, "batch_size": 4, "phase1_steps": 0},
        "eval": {"batch_size": 16, "max_new_tokens": 200},
        "output_dir": output_dir,
    })
