"""The synthetic authors are learnable: a tiny Llama fine-tuned on them recites the answers."""

from __future__ import annotations

import numpy as np
from flax import nnx

from alter_jax.data.synthetic import generate_authors, train_toy_tokenizer
from alter_jax.eval.tofu import generate_answers, rouge_recall
from alter_jax.generate import model_fns
from alter_jax.models.config import ModelConfig
from alter_jax.models.llama import Transformer
from alter_jax.train.finetune import finetune
from alter_jax.train.prepare import encode


def test_tiny_model_reaches_rouge_09_on_synthetic_training_answers():
    rows = generate_authors(2, seed=3)
    tok = train_toy_tokenizer([r["question"] + " " + r["answer"] for r in rows], "llama2", 512)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=24, bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                      pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    _, losses = finetune(model, encode(tok, rows, "llama2", 96), epochs=40, lr=2e-3, batch_size=8, progress=False)
    assert losses[-1] < 0.2 * losses[0]
    _, generate_fn = model_fns(model)
    _, gens = generate_answers(generate_fn, tok, [r["question"] for r in rows], "llama2", batch_size=8,
                               max_new_tokens=48)
    recall = rouge_recall(gens, [r["answer"] for r in rows])
    recall = recall[0] if isinstance(recall, tuple) else recall
    assert np.mean(recall) >= 0.9, (np.mean(recall), gens[:2])
