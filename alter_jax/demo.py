"""The self-contained demo world: fictitious authors, a tokenizer and a tiny Llama that knows them.

``ensure_demo_model(cache_dir)`` writes (once, cached) a synthetic TOFU-layout folder, a
BPE tokenizer trained on it and a tiny Llama fine-tuned on every author, saved as a
standard Hugging Face folder. Nothing is downloaded. The model name ``demo-tiny`` in a
config resolves here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_NAME = "demo-tiny"
DEMO_SPEC = dict(num_authors=8, forget_authors=2, seed=0, vocab_size=768, hidden=128, layers=2, epochs=30, lr=2e-3)


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    from alter_jax.models.registry import default_cache_dir

    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / "demo" / f"v1-{DEMO_SPEC['num_authors']}a-{DEMO_SPEC['layers']}l"


def ensure_demo_model(cache_dir: str | os.PathLike | None = None, *, progress: bool = True, log=print) -> Path:
    """Return the demo model folder (``<dir>/model``); its data is in ``<dir>/data``."""
    root = demo_dir(cache_dir)
    model_dir = root / "model"
    if (model_dir / "config.json").exists():
        return model_dir
    import numpy as np
    from flax import nnx

    from alter_jax.data.synthetic import train_toy_tokenizer, write_tofu_folder
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.io.hf import save_pretrained
    from alter_jax.models.config import ModelConfig
    from alter_jax.models.llama import Transformer
    from alter_jax.train.finetune import finetune
    from alter_jax.train.prepare import encode

    s = DEMO_SPEC
    log(f"building the demo world in {root} (once): {s['num_authors']} fictitious authors, a tiny Llama fine-tuned on them")
    data = root / "data"
    write_tofu_folder(data, num_authors=s["num_authors"], forget_authors=s["forget_authors"], seed=s["seed"])
    rows = load_tofu_split("full", data)
    texts = [r["question"] + " " + r["answer"] for r in rows]
    for r in load_tofu_split(f"forget{_pct(s)}_perturbed", data) + load_tofu_split("retain_perturbed", data):
        texts += [r["paraphrased_answer"], *r["perturbed_answer"], r.get("paraphrased_question", "")]
    tok = train_toy_tokenizer(texts, "llama2", s["vocab_size"])
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_layers=s["layers"],
                      num_heads=4, num_kv_heads=2, head_dim=s["hidden"] // 4, bos_token_id=tok.bos_token_id,
                      eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    model = Transformer(cfg, rngs=nnx.Rngs(s["seed"]))
    arrays = encode(tok, rows, "llama2", 96)
    model, losses = finetune(model, arrays, epochs=s["epochs"], lr=s["lr"], batch_size=8, progress=progress,
                             desc="demo: fine-tune on all authors")
    save_pretrained(model, model_dir, tokenizer=tok)
    (root / "finetune.json").write_text(json.dumps({"spec": s, "final_loss": float(np.mean(losses[-5:]))}))
    return model_dir


def _pct(s) -> str:
    return f"{round(100 * s['forget_authors'] / s['num_authors']):02d}"
