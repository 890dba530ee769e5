"""Demo: ALTER on a tiny Llama that knows 8 fictitious authors; forget 2 of them.

Runs on a laptop CPU in a few minutes with no downloads (the model is built and
fine-tuned on first use, then cached). Usage: bin/unlearn --config configs/demo.py
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict({
        "model": {"name": "demo-tiny", "prompt_format": "llama2", "max_length": 96},
        "adapter": {"rank": 8, "alpha": 16.0},
        "entropy": {"q": 1.0, "threshold": "quantile", "value": 0.3},
        "loss": {"beta": 1.0, "gamma": 1.0, "lambda_struct": 0.01},
        "optim": {"lr_a": 1e-5, "lr_b": 1e-3, "lr_router": 1e-2},
        "data": {"source": "demo", "forget_split": "forget25", "retain_split": "retain75", "num_subdomains": 2},
        "train": {"method": "alter", "epochs": 3, "batch_size": 4, "phase1_steps": 0, "checkpoint_every": 20},
        "eval": {"batch_size": 8, "max_new_tokens": 32, "num_questions": 40},
        "output_dir": "runs/demo",
    })
