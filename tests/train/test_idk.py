"""IdkNLL / IdkDPO and ALTER with forget_target="idk" (issue 19 item 3): loss values against the
formulas written out directly, gradients only where they belong, and demo-size runs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax import losses as L
from alter_jax.config import LossConfig
from alter_jax.data.batching import bucket_batch, forget_retain_batches
from alter_jax.data.tofu import pair_idk
from alter_jax.train.methods import get_method, uses_idk
from alter_jax.train.prepare import backbone_statistics
from alter_jax.train.step import Frozen, StepSettings, alter_isolated_loss, loss_and_grads, merge_model, split_model
from tests.train.conftest import TINY, make_side, tiny_model
from tests.train.test_isolation import OWNER, leaves_max


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _seq_logp(logits, targets, mask):
    """Σ_t m_t log p(target_t), float64, from [B, T, V] logits (targets already aligned)."""
    lsm = _np_log_softmax(logits)
    tok = np.take_along_axis(lsm, np.where(mask > 0, targets, 0)[..., None], -1)[..., 0]
    return (tok * mask).sum(-1)


def test_dpo_loss_matches_the_formula():
    rng = np.random.default_rng(0)
    b, t, v = 4, 6, 11
    lw, ll = rng.normal(size=(b, t, v)), rng.normal(size=(b, t, v))
    tw, tl = rng.integers(0, v, (b, t)), rng.integers(0, v, (b, t))
    mw, ml = (rng.uniform(size=(b, t)) > 0.3).astype(np.float32), (rng.uniform(size=(b, t)) > 0.3).astype(np.float32)
    mw[3] = 0.0  # a row without a preferred answer is left out of the mean
    rw, rl = rng.normal(-8, 1, b), rng.normal(-3, 1, b)
    beta = 0.1
    got = L.dpo_loss(jnp.asarray(lw), jnp.asarray(tw), jnp.asarray(mw), jnp.asarray(rw),
                     jnp.asarray(ll), jnp.asarray(tl), jnp.asarray(ml), jnp.asarray(rl), beta=beta)
    rho = (_seq_logp(lw, tw, mw) - rw) - (_seq_logp(ll, tl, ml) - rl)
    per = -(2 / beta) * np.log(1 / (1 + np.exp(-beta * rho)))
    np.testing.assert_allclose(float(got), per[:3].mean(), rtol=1e-5)
    # the reference enters without gradient; at θ = ref the gradient is that of NLL(win) − NLL(lose)
    g_ref = jax.grad(lambda r: L.dpo_loss_from_log_likelihood(jnp.zeros((b, t)), jnp.asarray(mw), r,
                                                              jnp.zeros((b, t)), jnp.asarray(ml), jnp.zeros(b)))(jnp.zeros(b))
    assert not np.any(np.asarray(g_ref))
    g = jax.grad(lambda lw_: L.dpo_loss_from_log_likelihood(lw_, jnp.asarray(mw), jnp.zeros(b), jnp.zeros((b, t)),
                                                            jnp.asarray(ml), jnp.zeros(b)))(jnp.zeros((b, t)))
    np.testing.assert_allclose(np.asarray(g)[:3], -mw[:3] / 3, rtol=1e-6)  # dℓ/dρ_w = −(2/β)·β·σ(0)... = −1; mean of 3


def test_pair_idk_is_seeded_and_keeps_the_question():
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    idk = ["I don't know.", "No idea.", "Not sure."]
    a, b = pair_idk(rows, idk, seed=3), pair_idk(rows, idk, seed=3)
    assert a == b and [r["question"] for r in a] == [r["question"] for r in rows]
    assert {r["answer"] for r in a} <= set(idk) and len({r["answer"] for r in a}) > 1
    assert all(r["answer"] == idk[r["idk_index"]] for r in a)
    assert pair_idk(rows, idk, seed=4) != a


def _setup(method, **loss_kw):
    spec = get_method(method)
    model = tiny_model(num_forget_experts=2 if spec.asymmetric else None)
    graphdef, trainable, parts = split_model(model, spec.trainable)
    frozen = Frozen(graphdef=graphdef, parts=parts, reference=None)
    return model, trainable, frozen, StepSettings(method=spec, loss=LossConfig(**loss_kw), q=1.0, threshold=1.2)


def _idk_batch(model, seed=0):
    """forget / retain / idk sides (the idk side shares the forget prompts, other answers), with the
    pre-pass reference log-probabilities of the backbone."""
    rng = np.random.default_rng(seed)
    sides = {s: make_side(rng, 3, 12, TINY.vocab_size, er) for s, er in (("forget", (1, 3)), ("retain", (0, 1)))}
    idk = {k: v.copy() for k, v in sides["forget"].items()}
    ans = idk["labels"] != -100
    idk["input_ids"] = np.where(ans, rng.integers(3, TINY.vocab_size, ans.shape), idk["input_ids"]).astype(np.int32)
    idk["labels"] = np.where(ans, idk["input_ids"], -100).astype(np.int32)
    sides["idk"] = idk
    for s in sides:
        sides[s]["ref_logp"] = backbone_statistics(model, sides[s], 1.0, batch_size=3, length_bucket=0)["ref_logp"]
    return sides


@pytest.mark.parametrize("method", ["idk_nll", "idk_dpo"])
def test_idk_losses_equal_the_direct_formulas(method):
    model, trainable, frozen, settings = _setup(method)
    batch = _idk_batch(model)
    loss, metrics, grads = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, batch), settings)
    m = merge_model(frozen.graphdef, trainable, frozen.parts)

    def side(s):
        lg = np.asarray(m(jnp.asarray(batch[s]["input_ids"]), jnp.asarray(batch[s]["attention_mask"])))[:, :-1]
        tgt = batch[s]["labels"][:, 1:]
        return lg, tgt, (tgt != -100).astype(np.float64)

    def nll(s):  # mean over every answer token of the side
        lg, tgt, msk = side(s)
        return -_seq_logp(lg, tgt, msk).sum() / msk.sum()

    retain = nll("retain")
    if method == "idk_nll":
        forget = nll("idk")
    else:  # at θ = backbone the log-ratios are 0: the loss is (2/β) log 2 exactly, the reference cancels
        lw, lw_t, lw_m = side("idk")
        ll, ll_t, ll_m = side("forget")
        rho = (_seq_logp(lw, lw_t, lw_m) - batch["idk"]["ref_logp"]) - (_seq_logp(ll, ll_t, ll_m) - batch["forget"]["ref_logp"])
        forget = np.mean(-(2 / 0.1) * np.log(1 / (1 + np.exp(-0.1 * rho))))
        assert forget == pytest.approx(2 / 0.1 * np.log(2), rel=1e-4)
    assert float(metrics["forget"]) == pytest.approx(forget, rel=1e-5)
    assert float(metrics["retain"]) == pytest.approx(retain, rel=1e-5)
    assert float(loss) == pytest.approx(forget + retain, rel=1e-5)
    assert set(grads) == {"backbone"} and leaves_max(grads["backbone"]) > 0


def test_idk_nll_never_reads_the_true_forget_answers():
    model, trainable, frozen, settings = _setup("idk_nll")
    batch = _idk_batch(model)
    other = {**batch, "forget": {**batch["forget"], "input_ids": np.full_like(batch["forget"]["input_ids"], 5)}}
    a = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, batch), settings)
    b = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, other), settings)
    assert float(a[0]) == float(b[0])
    for x, y in zip(jax.tree_util.tree_leaves(a[2]), jax.tree_util.tree_leaves(b[2])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_idk_dpo_scored_buckets_equal_full_rows():
    model, trainable, frozen, settings = _setup("idk_dpo")
    batch = _idk_batch(model)
    full = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, batch), settings)
    cut = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, bucket_batch(batch, 8)), settings)
    assert float(full[0]) == pytest.approx(float(cut[0]), rel=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(full[2]), jax.tree_util.tree_leaves(cut[2])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("loss_kw", [{"forget_target": "idk"}, {"forget_high_nll": 1.0}])
@pytest.mark.parametrize("term", list(OWNER))
def test_alter_switches_keep_isolation(batch, term, loss_kw):
    """ALTER with forget_target="idk" (NLL of the idk answer on forget rows) or forget_high_nll > 0 (NLL on
    high-entropy forget tokens): the forget term reaches only the forget experts, every other term only its
    own group (bitwise zero elsewhere)."""
    _, trainable, frozen, settings = _setup("alter", **loss_kw)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    grads = jax.grad(alter_isolated_loss)(trainable, frozen, batch, settings, terms=(term,))
    for group, g in grads.items():
        if group == OWNER[term]:
            assert leaves_max(g) > 0, group
        else:
            assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g)), f"{term} leaks into {group}"


def test_alter_idk_forget_term_is_nll_on_every_forget_answer_token(batch):
    _, trainable, frozen, settings = _setup("alter", forget_target="idk")
    _, m_idk, _ = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, batch), settings)
    _, m_ihl, _ = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, batch),
                                 dataclasses.replace(settings, loss=LossConfig()))
    assert "forget_ihl" not in m_idk and float(m_idk["forget_idk_nll"]) != float(m_ihl["forget_ihl"])
    assert float(m_idk["forget_idk_nll"]) > 0 and float(m_idk["retain"]) == pytest.approx(float(m_ihl["retain"]))


def test_uses_idk_and_aligned_batches():
    assert uses_idk(get_method("idk_nll"), LossConfig()) and uses_idk(get_method("idk_dpo"), LossConfig())
    assert uses_idk(get_method("alter"), LossConfig(forget_target="idk"))
    assert not uses_idk(get_method("alter"), LossConfig()) and not uses_idk(get_method("npo"), LossConfig())
    f = {"x": np.arange(5)}
    batches = list(forget_retain_batches(f, {"x": np.arange(3)}, 2, aligned={"idk": {"x": np.arange(5) + 100}}))
    assert all(np.array_equal(b["idk"]["x"], b["forget"]["x"] + 100) for b in batches)
    with pytest.raises(ValueError, match="aligned sides"):
        next(forget_retain_batches(f, f, 2, aligned={"idk": {"x": np.arange(4)}}))


@pytest.mark.parametrize("method,loss", [("idk_nll", {}), ("idk_dpo", {}), ("alter", {"forget_target": "idk"})])
def test_demo_size_run_finishes(tmp_path, method, loss):
    """A short demo run of each new method: trains, exports, and reports the idk answers' probability."""
    from alter_jax.train.loop import unlearn
    from tests.train.test_loop import demo_run

    lr = {"optim": {"lr": 1e-4}} if method != "alter" else {}
    run = demo_run(tmp_path / method, train={"method": method, "max_steps": 3, "epochs": 1},
                   eval={"num_questions": 4, "max_new_tokens": 8, "batch_size": 4}, loss=loss, **lr)
    rep = unlearn(run, progress=False, log=lambda *_: None)
    assert rep["steps"] == 3 and rep["data"]["idk"]["answers"] >= 2
    for side in ("before", "after"):
        assert 0.0 < rep[side]["forget"]["idk_prob"] < 1.0
        assert 0.0 <= rep[side]["forget"]["degenerate_rate"] <= 1.0
    assert rep["after"]["forget"]["idk_prob"] > rep["before"]["forget"]["idk_prob"]  # it moves towards "I don't know"


def test_forget_high_nll_adds_the_high_entropy_nll(batch):
    _, trainable, frozen, settings = _setup("alter")
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    l0, m0, _ = loss_and_grads(trainable, frozen, jb, settings)
    l1, m1, _ = loss_and_grads(trainable, frozen, jb, dataclasses.replace(settings, loss=LossConfig(forget_high_nll=0.5)))
    assert "forget_high_nll" not in m0 and float(m1["forget_high_nll"]) > 0
    assert float(m1["forget_ihl"]) == pytest.approx(float(m0["forget_ihl"]))
    assert float(l1) == pytest.approx(float(l0) + 0.5 * float(m1["forget_high_nll"]), rel=1e-5)


def test_ihl_margin_is_a_floored_shift_of_ihl(batch):
    _, trainable, frozen, settings = _setup("alter")
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    _, m1, _ = loss_and_grads(trainable, frozen, jb, settings)
    _, m_half, _ = loss_and_grads(trainable, frozen, jb, dataclasses.replace(settings, loss=LossConfig(ihl_margin=0.5)))
    # with a near-uniform random model p_t ≈ max p_v, so IHL_t ≈ 1 and the hinge with m = 0.5 ≈ IHL_t − 0.5
    assert float(m_half["forget_ihl"]) == pytest.approx(float(m1["forget_ihl"]) - 0.5, abs=1e-4)
    from alter_jax import config as C

    with pytest.raises(C.ConfigValueError, match="ihl_margin"):
        C.build({"loss": {"ihl_margin": 1.5}})
    with pytest.raises(C.ConfigValueError, match="ihl_margin"):
        C.build({"loss": {"ihl_margin": 0.0}})


def test_forget_expert_switches_are_refused_for_other_methods():
    from alter_jax import config as C

    for loss in ({"forget_target": "idk"}, {"forget_high_nll": 0.5}, {"ihl_margin": 0.5}):
        with pytest.raises(C.ConfigValueError, match="forget experts"):
            C.build({"train": {"method": "npo"}, "loss": loss})
        C.build({"train": {"method": "alter"}, "loss": loss})  # fine for ALTER
    with pytest.raises(C.ConfigValueError, match="forget_target"):
        C.build({"loss": {"forget_target": "refuse"}})
