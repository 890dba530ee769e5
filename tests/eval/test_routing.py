"""The routing diagnostic (alter_jax/eval/routing.py) on a tiny random ALTER model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax.eval.routing import (adapter_settings, base_entropy_generate_fn, capture_gate_weights, routing_trace,
                                    summarize_trace)
from alter_jax.gated import GateConfig, gated_generate, gated_logits
from tests.train.conftest import TINY, tiny_model


class Tok:
    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=False):
        return "".join("." if i % 4 == 0 else chr(ord("a") + i % 26) for i in ids)


def _prompts(n=3, p=6, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, TINY.vocab_size, p - (k % 2))) for k in range(n)]


def _left(prompts, width):
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for k, p in enumerate(prompts):
        ids[k, width - len(p):], mask[k, width - len(p):] = p, 1
    return ids, mask


def test_base_entropy_decoding_equals_the_brute_force_loop():
    model = tiny_model()
    gate = GateConfig(q=1.0, threshold=1.0)
    ids, mask = _left(_prompts(), 8)
    got = base_entropy_generate_fn(model, gate, eos_ids=(9999,), pad_id=0)(ids, mask, 4)
    cur_ids, cur_mask = ids, mask
    for _ in range(4):  # backbone entropies for every token, the gated model's argmax at the last position
        lg = np.asarray(gated_logits(model, cur_ids, cur_mask, GateConfig(q=1.0, threshold=1.0, source="base")))
        nxt = lg[:, -1].argmax(-1).astype(np.int32)
        cur_ids = np.concatenate([cur_ids, nxt[:, None]], 1)
        cur_mask = np.concatenate([cur_mask, np.ones((len(nxt), 1), np.int32)], 1)
    np.testing.assert_array_equal(got, cur_ids[:, 8:])


def test_trace_records_every_generated_token_and_the_retain_bias_moves_routing():
    model = tiny_model()
    tok, gate = Tok(), GateConfig(q=1.0, threshold=1.0)
    prompts = _prompts(4)
    ids, mask = _left(prompts, 8)
    gen = np.asarray(gated_generate(model, ids, mask, gate, 5, eos_token_ids=(9999,), pad_token_id=0).tokens)
    gens = [list(map(int, g)) for g in gen]
    sides = ["forget", "forget", "retain", "retain"]
    recs = routing_trace(model, tok, gate, prompts, gens, sides, [1, 2, 1, 1], batch_size=4)
    assert len(recs) == 20 and {r["side"] for r in recs} == {"forget", "retain"}
    for r in recs:
        assert 0.0 <= r["top_forget_share"] <= 1.0 and 0.0 <= r["forget_weight"] <= 1.0 + 1e-6
    # the trace's gated prediction is what decoding produced (its entropies reproduce decoding)
    s = summarize_trace(recs)
    assert s["forget"]["all"]["tokens"] == 10 and s["forget"]["first_token"]["tokens"] == 2
    # a huge retain bias sends every token to B_r: no forget weight, and the gated model is the retain expert
    with adapter_settings(model, retain_bias=1e4):
        gen_b = np.asarray(gated_generate(model, ids, mask, gate, 5, eos_token_ids=(9999,), pad_token_id=0).tokens)
        recs_b = routing_trace(model, tok, gate, prompts, [list(map(int, g)) for g in gen_b], sides, [1, 2, 1, 1],
                               batch_size=4)
    assert all(r["top_forget_share"] == 0.0 and r["forget_weight"] < 1e-6 for r in recs_b)
    assert all(r["same_as_retain_expert"] for r in recs_b)
    assert model.layers[0].self_attn.q_proj.adapter.cfg.retain_bias == 2.0  # restored


def test_capture_sees_one_weight_tensor_per_adapted_layer():
    model = tiny_model()
    ids, mask = _left(_prompts(2), 8)
    s = jnp.zeros(ids.shape, jnp.float32)
    from alter_jax.adapters.lora import GatedRouting

    records: list = []
    with capture_gate_weights(records):
        model(jnp.asarray(ids), jnp.asarray(mask), adapter_ctx=GatedRouting(s, s > 1.0))
    assert len(records) == 2 * 7 and records[0].shape == (2, 8, 3)
    np.testing.assert_allclose(records[0].sum(-1), 1.0, atol=1e-6)


def test_parse_settings():
    from alter_jax.eval.routing import parse_settings

    grid = parse_settings("retain_bias=0; top_k=1+tau_high=2 ;generation_source=base")
    assert grid == (("as trained", {}), ("retain_bias=0", {"retain_bias": 0.0}),
                    ("top_k=1+tau_high=2", {"top_k": 1, "tau_high": 2.0}),
                    ("generation_source=base", {"generation_source": "base"}))
    with pytest.raises(ValueError, match="unknown key"):
        parse_settings("rank=3")
    with pytest.raises(ValueError, match="key=value"):
        parse_settings("retain_bias")
