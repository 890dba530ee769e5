"""Sampled decoding: seeded, filtered, EOS-stopped."""

from __future__ import annotations

import numpy as np
from flax import nnx

from alter_jax.generate import generate
from alter_jax.models.config import ModelConfig
from alter_jax.models.llama import Transformer

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, eos_token_ids=(2,), pad_token_id=0)


def prompts():
    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], np.int32)
    return ids, (ids > 0).astype(np.int32)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    ids, mask = prompts()
    a = np.asarray(generate(model, ids, mask, max_new_tokens=12, temperature=1.0, rng=3).tokens)
    b = np.asarray(generate(model, ids, mask, max_new_tokens=12, temperature=1.0, rng=3).tokens)
    c = np.asarray(generate(model, ids, mask, max_new_tokens=12, temperature=1.0, rng=4).tokens)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = np.asarray(generate(model, ids, mask, max_new_tokens=12).tokens)
    top1 = np.asarray(generate(model, ids, mask, max_new_tokens=12, temperature=0.7, top_k=1, rng=5).tokens)
    np.testing.assert_array_equal(greedy, top1)
    tiny_p = np.asarray(generate(model, ids, mask, max_new_tokens=12, temperature=1.0, top_p=1e-6, rng=6).tokens)
    np.testing.assert_array_equal(greedy, tiny_p)  # top-p keeps only the most likely token


def test_rows_stop_at_eos_and_pad_after():
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    ids, mask = prompts()
    free = np.asarray(generate(model, ids, mask, max_new_tokens=8, eos_token_ids=(49,)).tokens)
    eos = int(free[0, 3])  # make row 0's 4th greedy token the EOS
    out = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=0)
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    first = int(np.argmax(free[0] == eos))
    assert lengths[0] == first + 1 and toks[0, first] == eos and (toks[0, first + 1:] == 0).all()
    np.testing.assert_array_equal(toks[0, : first + 1], free[0, : first + 1])
