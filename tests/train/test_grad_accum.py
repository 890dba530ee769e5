"""Token-weighted gradient accumulation (issue 13 item 5): K weighted micro-batches give the
gradient of one batch holding all their rows, i.e. each term's sum over its tokens divided by
the window's token count, not a mean of per-micro-batch means."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from alter_jax.data.batching import bucket_batch
from alter_jax.train.loop import unlearn, weighted_windows
from alter_jax.train.step import accumulation_weights, term_counts
from alter_jax.train.step import loss_and_grads as _loss_and_grads
from tests.train.test_loop import demo_run
from tests.train.test_scored_head import _long_batch, _max_diff, _setup


loss_and_grads = jax.jit(_loss_and_grads, static_argnums=3)  # compiled: far faster than op by op here


def _take(batch, idx):
    return {s: {k: v[idx] for k, v in batch[s].items()} for s in batch}


def _dev(b):
    return jax.tree_util.tree_map(jnp.asarray, b)


@pytest.mark.parametrize("method,loss_kw", [  # token means (ALTER's four terms, GD), per-example means (NPO)
    ("alter", {}), ("asymlora", {}), ("graddiff", {}), ("npo_gd", {}),
])
def test_weighted_micro_batches_give_the_gradient_of_their_union(method, loss_kw):
    trainable, frozen, settings = _setup(method, **loss_kw)
    full = _long_batch(seed=2)  # 3 + 3 rows of different lengths, every term non-empty in both parts
    parts = [bucket_batch(_take(full, [0, 1]), 8), bucket_batch(_take(full, [2]), 8)]  # unequal micro-batches
    counts = [{t: float(v) for t, v in term_counts(_dev(p), settings).items()} for p in parts]
    assert all(c > 0 for cs in counts for c in cs.values())
    weights = accumulation_weights(counts)
    grads = [loss_and_grads(trainable, frozen, _dev({**p, "weights": {t: np.float32(v) for t, v in w.items()}}),
                            settings)[2] for p, w in zip(parts, weights)]
    accumulated = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)  # what optax.MultiSteps applies
    _, _, union = loss_and_grads(trainable, frozen, _dev(bucket_batch(full, 8)), settings)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(union))
    assert _max_diff(accumulated, union) <= 1e-5 * max(1.0, scale)
    # the plain mean of per-micro-batch means is a different gradient (the test is not vacuous)
    plain = [loss_and_grads(trainable, frozen, _dev(p), settings)[2] for p in parts]
    assert _max_diff(jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *plain), union) > 1e-4 * scale


def test_weights_sum_to_k_and_metrics_stay_unweighted():
    trainable, frozen, settings = _setup("alter")
    full = _long_batch(seed=1)
    parts = [bucket_batch(_take(full, [i]), 8) for i in range(3)]
    counts = [{t: float(v) for t, v in term_counts(_dev(p), settings).items()} for p in parts]
    weights = accumulation_weights(counts)
    for t in weights[0]:
        assert sum(w[t] for w in weights) == pytest.approx(3.0)
    assert accumulation_weights([{"a": 0.0}, {"a": 0.0}]) == [{"a": 0.0}, {"a": 0.0}]  # no tokens: no weight
    w = {t: np.float32(v) for t, v in weights[0].items()}
    loss_w, m_w, _ = loss_and_grads(trainable, frozen, _dev({**parts[0], "weights": w}), settings)
    loss_p, m_p, _ = loss_and_grads(trainable, frozen, _dev(parts[0]), settings)
    assert float(loss_w) == float(loss_p) and {k: float(v) for k, v in m_w.items()} == {
        k: float(v) for k, v in m_p.items()}


def test_windows_align_with_the_step_count_and_resume_inside_a_window():
    items = [(g, {"n": g}) for g in range(7)]
    counts_fn = lambda b: {"t": jnp.float32(b["n"] + 1)}  # noqa: E731
    out = list(weighted_windows(iter(items), 3, counts_fn))
    assert [k for k, _ in out] == list(range(7))
    w = [float(b["weights"]["t"]) for _, b in out]
    np.testing.assert_allclose(w[:3], [3 * 1 / 6, 3 * 2 / 6, 3 * 3 / 6], rtol=1e-6)  # window 0..2
    np.testing.assert_allclose(w[3:6], [3 * 4 / 15, 3 * 5 / 15, 3 * 6 / 15], rtol=1e-6)
    assert w[6] == 1.0  # a short last window weighs within itself (MultiSteps never applies it)
    resumed = list(weighted_windows(iter(items), 3, counts_fn, start=4))  # step 4 is inside window 3..5
    assert [k for k, _ in resumed] == [4, 5, 6]
    assert [float(b["weights"]["t"]) for _, b in resumed] == [float(b["weights"]["t"]) for _, b in out[4:]]
    made = []
    lazy = [(g, (lambda g=g: made.append(g) or {"n": g})) for g in range(7)]  # batches built on demand
    assert [k for k, _ in weighted_windows(iter(lazy), 3, counts_fn, start=4)] == [4, 5, 6]
    assert made == [3, 4, 5, 6]  # the window before the resume point is never built
    assert [k for k, _ in weighted_windows(iter(items), 1, counts_fn, start=5)] == [5, 6]
    assert all("weights" not in b for _, b in weighted_windows(iter(items), 1, counts_fn))


def _adapter(path):
    return load_file(path / "adapter" / "alter_adapter.safetensors")


def test_accumulated_run_equals_the_large_batch_run_and_resumes_bitwise(tmp_path):
    """grad_accum=2 × batch 2 updates the adapters as batch 4 does (same rows, same pairing:
    a batch of 4 is two consecutive batches of 2 of the same permutation); a run interrupted
    inside an accumulation window resumes bitwise."""
    ev = {"num_questions": 4, "max_new_tokens": 4, "batch_size": 4}
    big = demo_run(tmp_path / "big", train={"max_steps": 3, "epochs": 1, "batch_size": 4}, eval=ev)
    unlearn(big, progress=False, log=lambda *_: None)
    acc = demo_run(tmp_path / "acc", train={"max_steps": 6, "epochs": 1, "batch_size": 2, "checkpoint_every": 1},
                   eval=ev)
    acc = dataclasses.replace(acc, optim=dataclasses.replace(acc.optim, grad_accum=2))
    unlearn(acc, progress=False, log=lambda *_: None)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-5, rtol=1e-4, err_msg=k)

    broken = dataclasses.replace(acc, output_dir=str(tmp_path / "broken"))
    with pytest.raises(KeyboardInterrupt):
        # after 3 micro-steps: micro-batch 2, the first of the window (2, 3), is accumulated, not applied
        unlearn(broken, progress=False, log=lambda *_: None, interrupt_after_step=3)
    unlearn(broken, progress=False, log=lambda *_: None)
    c = _adapter(tmp_path / "broken")
    for k in b:
        np.testing.assert_array_equal(b[k], c[k], err_msg=k)
