"""Relearning attack (alter_jax.eval.relearn; issue 15 item 6).

Unit tests on a tiny random model (the attacker's loss IS the gated forward's NLL; which
groups get a gradient), then the attack on finished demo runs: an ALTER run relearned
through the gated model and a full-parameter GA baseline through the CLI. Before
relearning the held-out forget prob is low; after k steps it rises.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alter_jax import gated as G
from alter_jax import losses as L
from alter_jax.eval import relearn as R
from alter_jax.train.loop import unlearn
from alter_jax.train.methods import get_method
from alter_jax.train.step import split_model
from tests.test_gated import gated_tiny
from tests.train.test_loop import demo_run

QUIET = dict(progress=False, log=lambda *_: None)
# the runs' own before/after evaluation: small, and the same shapes the attack scores with (compiled once)
EVAL = {"num_questions": 4, "max_new_tokens": 4, "batch_size": 8}


# ----------------------------------------------------------------------------- units
def _batch(seed=0, b=3, t=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, -2:] = 0
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    labels[:, :3] = -100  # the question
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels)


def test_attacker_loss_is_the_gated_forward_and_reaches_the_forget_experts():
    model = gated_tiny(num_forget_experts=2)
    ids, mask, labels = _batch()
    _, s = G.gated_logits(model, ids, mask, G.GateConfig(q=1.0, threshold=0.0), return_entropy=True)
    theta = float(np.median(np.asarray(s)[np.asarray(mask) > 0]))  # both high- and low-entropy tokens
    gate = G.GateConfig(q=1.0, threshold=theta)
    lg, tg, m = L.shift_logits_labels(G.gated_logits(model, ids, mask, gate), labels)
    want = float(L.nll_loss(lg, tg, m))

    groups = ("shared_a", "retain_expert", "forget_experts", "router")
    graphdef, trainable, parts = split_model(model, groups)
    fn = lambda tr, gated: R.relearn_loss(tr, parts, ids, mask, labels, jnp.float32(theta), graphdef=graphdef,
                                          gated=gated, q=1.0)
    vg = jax.jit(jax.value_and_grad(fn), static_argnums=1)
    got, grads = vg(trainable, True)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    norms = {g: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(grads[g])))) for g in groups}
    assert all(v > 0 for v in norms.values()), norms  # gated: every group, router included, gets a gradient
    _, plain = vg(trainable, False)  # the ungated forward (expert 0 only) would miss them
    assert all(float(jnp.abs(x).max()) == 0 for g in ("forget_experts", "router") for x in jax.tree_util.tree_leaves(plain[g]))


def test_parameter_changes_per_expert_and_split():
    before = {("forget_experts", "layers", "0", "mlp", "up_proj", "adapter", "forget_experts"): np.ones((2, 3, 2)),
              ("retain_expert", "layers", "0", "mlp", "up_proj", "adapter", "retain_expert"): np.zeros((3, 2))}
    after = {k: v.copy() for k, v in before.items()}
    after[next(iter(after))][1] *= 1.5  # expert 2 only
    ch = R.parameter_changes(before, after, per_layer_type=True)
    assert ch["forget_expert_1"]["relative"] == 0.0 and ch["forget_expert_2"]["relative"] == pytest.approx(0.5)
    assert ch["retain_expert"]["relative"] is None  # zero norm before: no relative change
    assert ch["per_layer_type"]["up_proj"]["forget_expert_2"] == pytest.approx(0.5)
    tr, ev = R.split_rows(10, 0.5, seed=3)
    assert len(tr) == 5 and sorted(np.concatenate([tr, ev]).tolist()) == list(range(10))
    assert (tr == R.split_rows(10, 0.5, seed=3)[0]).all()
    with pytest.raises(ValueError, match="increasing"):
        R.RelearnConfig(steps=(4, 2))
    with pytest.raises(ValueError, match="not defined for alter"):
        R.resolve_mode("lora", get_method("alter"))
    assert R.resolve_mode("auto", get_method("alter")) == "adapter"
    assert R.resolve_mode("auto", get_method("ga")) == "lora"


# ----------------------------------------------------------------------------- demo runs
@pytest.fixture(scope="module")
def alter_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("relearn") / "alter"
    unlearn(demo_run(out, eval=EVAL), **QUIET)  # ALTER, 3 epochs: forget prob 0.99 -> ~0.04
    return out


def test_alter_relearning_through_the_gated_model_recovers(alter_run):
    cfg = R.RelearnConfig(steps=(0, 2, 6), num_eval=8, reference=False)
    res = R.relearn(alter_run, cfg, **QUIET)
    assert res["gated"] and res["mode"] == "adapter"
    assert set(res["trainable_groups"]) == {"shared_a", "retain_expert", "forget_experts", "router"}
    assert not set(res["split"]["train"]) & set(res["split"]["eval"])  # scored rows are never trained on
    s = res["schedule"]
    assert [r["k"] for r in s] == [0, 2, 6]
    assert s[0]["prob"] < 0.3  # unlearned: held-out forget prob is low
    assert s[-1]["prob"] > s[0]["prob"] + 0.2  # the knowledge comes back on rows the attacker never saw
    assert s[-1]["truth_ratio_mean_r"] > s[0]["truth_ratio_mean_r"]
    assert all(v == 0 for v in s[0]["moved"].values())
    moved = s[-1]["moved"]
    assert set(moved) == {"shared_a", "retain_expert", "forget_expert_1", "forget_expert_2", "router"}
    assert all(v > 0 for v in moved.values()), moved
    share = s[-1]["grad_share"]
    assert set(share) == set(moved) and sum(share.values()) == pytest.approx(1.0)
    assert share["forget_expert_1"] + share["forget_expert_2"] > 0  # relearning reaches the forget experts
    assert set(res["moved_final"]["per_layer_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}
    saved = json.loads((alter_run / "relearn" / "relearn_adapter.json").read_text())
    assert saved["schedule"][-1]["prob"] == pytest.approx(s[-1]["prob"])
    assert (alter_run / "relearn" / "relearn_adapter.png").stat().st_size > 0
    again = R.relearn(alter_run, dataclasses.replace(cfg, mode="adapter"), reuse=True, **QUIET)  # a study rerun
    assert again["wall_s"] == saved["wall_s"]
    assert R.saved_result(alter_run / "relearn", "adapter", dataclasses.replace(cfg, seed=1)) is None


def test_alter_full_parameter_relearning_stays_gated(alter_run, tmp_path):
    res = R.relearn(alter_run, R.RelearnConfig(steps=(0, 4), mode="full", num_eval=8, reference=False),
                    out=tmp_path, **QUIET)
    assert res["gated"] and res["trainable_groups"][0] == "backbone"
    s = res["schedule"]
    assert s[-1]["prob"] > s[0]["prob"] + 0.1
    assert s[-1]["moved"]["backbone"] > 0 and s[-1]["moved"]["forget_expert_1"] > 0
    assert (tmp_path / "relearn_full.json").is_file()


def test_ga_baseline_relearning_from_the_cli(tmp_path, capsys):
    from alter_jax.cli.evaluate import main

    run_dir = tmp_path / "ga"
    unlearn(demo_run(run_dir, eval=EVAL, train={"method": "ga", "max_steps": 4, "epochs": 1}, optim={"lr": 1e-3}),
            **QUIET)
    assert main(["relearn", "--run", str(run_dir), "--steps", "0,4", "--num-eval", "8", "--no-reference",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 0
    assert "relearning attack" in capsys.readouterr().out
    res = json.loads((tmp_path / "out" / "relearn_lora.json").read_text())
    assert res["mode"] == "lora" and not res["gated"]  # a fresh LoRA on the GA model
    s = res["schedule"]
    assert s[0]["prob"] < 0.3 and s[-1]["prob"] > s[0]["prob"] + 0.1
    assert res["moved_final"]["shared_a"]["relative"] > 0 and res["moved_final"]["retain_expert"]["norm_before"] == 0
    assert main(["relearn", "--run", str(run_dir), "--mode", "adapter"]) == 2  # GA has no adapter: clear error
    assert "--mode adapter needs an adapter run" in capsys.readouterr().err

    # rows without paraphrased / perturbed answers: prob and ROUGE as with them, no truth ratio
    from alter_jax.generate import model_fns

    loaded = R.load_run(run_dir)
    lf, gf = model_fns(loaded.model)
    rows = loaded.forget[:8]
    tok, args = loaded.tokenizer, ("llama2", 96, 8, 4)  # format, max_length, batch, new tokens: the run's
    full = R.score_forget(lf, gf, tok, rows, *args)
    bare = R.score_forget(lf, gf, tok, [{"question": r["question"], "answer": r["answer"]} for r in rows], *args)
    assert full["truth_ratio"] is not None and bare["truth_ratio"] is None and bare["truth_ratio_mean_r"] is None
    assert bare["prob"] == pytest.approx(full["prob"], rel=1e-6)
    assert bare["rouge_l_recall"] == pytest.approx(full["rouge_l_recall"])
