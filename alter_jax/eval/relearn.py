"""Relearning attack (issue 15 item 6; ALTER paper, limitation 4): does the forgotten knowledge come back?

The attacker holds the unlearned model of a finished run and part of the forget set. It
fine-tunes the model for ``k`` optimizer steps on that part (next-token NLL on answer tokens,
the question masked, as TOFU fine-tuning), and we measure how much comes back on the *other*
part, which the attacker never trained on, as functions of ``k`` (Hu et al. 2024, "Jogging the
Memory of Unlearned LLMs Through Targeted Relearning Attacks"; Lynch et al. 2024, "Eight Methods
to Evaluate Robust Unlearning in LLMs").

Split: the forget rows are permuted with ``numpy.random.default_rng(seed)``; the first
``round(train_frac · N)`` rows are the attacker's (``train``), the rest are scored (``eval``).

Attacker parameters (``mode``):

* ``adapter`` (default for ALTER / AsymLoRA runs): the run's own adapter keeps training on a
  frozen backbone. ALTER / AsymLoRA: every adapter group (shared ``A``, retain expert ``B_r``, forget
  experts ``B_f^d``, router ``W_g``), **through the entropy-gated forward** (Eq. 9, the model as it
  is deployed): each step runs a backbone prefill for ``S_q`` (stop-gradient), then the adapted
  forward with ``GatedRouting(S, S > θ)``, so the gradient reaches exactly the experts the router
  selects (low-entropy tokens: the argmax expert; high-entropy tokens: the renormalised top-k, whose
  router weights also get a gradient through the softmax). Plain LoRA runs: ``A`` and ``B``.
* ``full``: every backbone parameter too (ALTER: backbone + all adapter groups, still gated, with
  ``S`` recomputed from the *current* backbone every step, as gated inference does). A plain LoRA
  run is merged into its backbone first; a full-parameter run trains its ``model/``.
* ``lora``: a fresh LoRA (rank ``rank``, ``alpha``, every linear layer, zero ``B``) on the merged
  model (default for every other run). Not defined for ALTER / AsymLoRA: the gated model has no
  merged form (routing is per token) and a layer holds one adapter; use ``adapter`` or ``full``.

Optimizer: :func:`alter_jax.train.optim.make_optimizer` (AdamW per group, constant learning rate,
no warm-up or weight decay), the train step's model plumbing
(:func:`alter_jax.train.step.split_model` / :func:`~alter_jax.train.step.forward`), loss
:func:`alter_jax.losses.nll_loss`. Batches: ``batch_size`` rows of ``train``, seeded reshuffle each
pass, a short last batch filled by repetition (static shapes, one compiled step).

Measured at every ``k`` of the schedule on ``eval`` (:mod:`alter_jax.eval.tofu`, TOFU formulas, the
model seen through ``train.loop.model_eval_fns``: gated for ALTER / AsymLoRA):

* ``prob``: mean ``exp(−mean answer-token NLL)``;
* ``rouge_l_recall``: mean ROUGE-L recall of the greedy answer;
* ``truth_ratio``: TOFU's forget statistic, mean ``min(R, 1/R)``, and ``truth_ratio_mean_r``, the mean
  of ``R = P(perturbed)^(1/n) / P(paraphrased)^(1/n)`` inverted, i.e. ``exp(mean perturbed NLL −
  paraphrased NLL)``: > 1 when the model prefers the true paraphrase; it rises as knowledge returns.
  Both need ``paraphrased_answer`` / ``perturbed_answer`` (from ``<forget_split>_perturbed``);
  ``None`` otherwise;
* ``retain_prob``: answer prob on the first ``num_retain`` retain rows (collateral of the attack).
* ``moved``: which parameters the attack changed: ``‖θ_k − θ_0‖ / ‖θ_0‖`` (Frobenius over all layers)
  per group, the forget experts one by one (``forget_expert_<d>``, expert index ``d`` as in the
  router, 0 = ``retain_expert``), with ``moved_delta_norm`` = ``‖θ_k − θ_0‖`` beside it (the only
  figure for a fresh LoRA ``B``, whose ``‖θ_0‖ = 0``); at the last ``k`` also per layer type. Adam
  moves every parameter with a gradient by about ``lr`` per step, so ``moved`` favours small-norm
  units; ``grad_share`` says where the loss gradient itself flows: ``Σ_steps ‖g_unit‖² / Σ_steps ‖g‖²``
  over the steps so far (raw gradients, before the optimizer).

Reference: ``base`` holds prob and ROUGE of the model *before* unlearning on ``eval`` and
``recovery`` = ``(prob_k − prob_0) / (prob_base − prob_0)`` (share of the unlearned probability
mass that came back; needs ``k = 0`` in the schedule and ``reference``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

MODES = ("auto", "adapter", "full", "lora")
ADAPTER_GROUPS = ("shared_a", "retain_expert", "forget_experts", "router")


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    """Settings of one relearning attack (defaults: ``bin/evaluate relearn``)."""

    steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16)  # k: the schedule at which recovery is measured
    mode: str = "auto"  # auto | adapter | full | lora (module docstring)
    lr: float | None = None  # None: 1e-3 for adapter / lora, 1e-4 for full
    batch_size: int = 4
    train_frac: float = 0.5  # share of the forget rows the attacker trains on
    seed: int = 0  # split and batch order
    rank: int = 8  # lora mode
    alpha: float = 16.0
    clip_norm: float = 0.0
    num_eval: int = 0  # 0 = every held-out forget row
    num_retain: int = 0  # retain rows for retain_prob (0 = as many as held-out forget rows)
    max_new_tokens: int | None = None  # None: the run's eval.max_new_tokens
    eval_batch_size: int | None = None  # None: the run's eval.batch_size
    reference: bool = True  # also score the model before unlearning

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"relearn: mode {self.mode!r} is not one of {', '.join(MODES)}")
        steps = tuple(int(k) for k in self.steps)
        if not steps or any(k < 0 for k in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"relearn: steps must be distinct non-negative integers in increasing order, got {self.steps!r}"
                             " (e.g. --steps 0,1,2,4,8)")
        object.__setattr__(self, "steps", steps)
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"relearn: train_frac must be in (0, 1), got {self.train_frac}")
        if self.batch_size < 1:
            raise ValueError(f"relearn: batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"relearn: lr must be > 0, got {self.lr}")

    def learning_rate(self, mode: str) -> float:
        return self.lr if self.lr is not None else (1e-4 if mode == "full" else 1e-3)


# ----------------------------------------------------------------------------- pure pieces
def split_rows(n: int, train_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` -> ``(train_idx, eval_idx)``, each sorted, both non-empty."""
    if n < 2:
        raise ValueError(f"relearn: the forget set has {n} row(s); the attack needs at least 2 (one to train, one to score)")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(1, int(round(train_frac * n))), n - 1)
    return np.sort(perm[:k]), np.sort(perm[k:])


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_params(trainable: dict) -> dict[tuple[str, ...], np.ndarray]:
    """``{(group, *path): float32 array}`` of a trainable ``{group: nnx.State}`` pytree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainable):
        keys = tuple(_key_str(k) for k in path)
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        out[keys] = np.array(leaf, np.float32, copy=True)  # a copy: the step donates its buffers
    return out


def _units(path: tuple[str, ...], arr: np.ndarray):
    """The reporting units of one parameter: ``(name, layer_type, array)`` (forget experts one by one)."""
    group = path[0]
    layer_type = path[path.index("adapter") - 1] if "adapter" in path else (path[-2] if len(path) > 2 else path[-1])
    if group == "forget_experts":
        return [(f"forget_expert_{d + 1}", layer_type, arr[d]) for d in range(arr.shape[0])]
    return [(group, layer_type, arr)]


def parameter_changes(before: dict, after: dict, per_layer_type: bool = False) -> dict[str, Any]:
    """Relative change ``‖after − before‖ / ‖before‖`` (Frobenius, summed over layers) per unit.

    Units: ``shared_a``, ``retain_expert``, ``forget_expert_<d>`` (d = router index), ``router``,
    ``backbone``. Returns ``{unit: {"relative", "delta_norm", "norm_before"}}`` and, with
    ``per_layer_type``, ``{"per_layer_type": {layer_type: {unit: relative}}}`` beside them.
    ``relative`` is ``None`` when ``‖before‖ = 0`` (e.g. a fresh LoRA ``B``).
    """
    acc: dict[str, list[float]] = {}
    acc_lt: dict[tuple[str, str], list[float]] = {}
    for path, b in before.items():
        a = after[path]
        for (name, lt, ub), (_, _, ua) in zip(_units(path, b), _units(path, a)):
            d2, n2 = float(np.sum((ua - ub) ** 2)), float(np.sum(ub ** 2))
            for key, store in ((name, acc), ((lt, name), acc_lt)):
                s = store.setdefault(key, [0.0, 0.0])
                s[0] += d2
                s[1] += n2

    def rel(d2, n2):
        return float(np.sqrt(d2 / n2)) if n2 > 0 else None

    out: dict[str, Any] = {u: {"relative": rel(d2, n2), "delta_norm": float(np.sqrt(d2)), "norm_before": float(np.sqrt(n2))}
                           for u, (d2, n2) in sorted(acc.items())}
    if per_layer_type:
        table: dict[str, dict[str, float | None]] = {}
        for (lt, u), (d2, n2) in sorted(acc_lt.items()):
            table.setdefault(lt, {})[u] = rel(d2, n2)
        out["per_layer_type"] = table
    return out


def _detached(model):
    """The same NNX model with every adapter removed (exactly the backbone ``W0``)."""
    from alter_jax.models.llama import linear_layers

    for lin in linear_layers(model).values():
        lin.adapter = None
    return model


def relearn_loss(trainable, parts, ids, mask, labels, threshold, *, graphdef, gated: bool, q: float):
    """Answer-token NLL of the attacked model (scalar).

    ``gated``: the entropy-gated forward of :mod:`alter_jax.gated` (``source="base"``): ``S`` from a
    backbone prefill of the *current* parameters (stop-gradient), ``high = S > threshold``, then the
    adapted forward with ``GatedRouting``. Else the plain forward (adapters, if any, on expert 0).
    ids / mask / labels: ``int32[B, T]``.
    """
    from alter_jax import losses as L
    from alter_jax.adapters.lora import GatedRouting
    from alter_jax.gated import token_entropy_from_logits
    from alter_jax.train.step import forward, merge_model

    ctx = None
    if gated:
        base_logits = _detached(merge_model(graphdef, trainable, parts))(ids, mask)
        s = jax.lax.stop_gradient(token_entropy_from_logits(base_logits, q, mask))
        ctx = GatedRouting(entropy=s, high=s > threshold)
    logits, _ = forward(graphdef, trainable, parts, ids, mask, ctx)
    lg, tg, m = L.shift_logits_labels(logits, labels)
    return L.nll_loss(lg, tg, m)


@functools.partial(jax.jit, static_argnames=("graphdef", "gated", "q", "tx"), donate_argnums=(0,))
def relearn_step(state, parts, ids, mask, labels, threshold, *, graphdef, gated: bool, q: float, tx):
    """One attacker step -> ``(TrainState, loss, grad_sq)``.

    ``grad_sq``: the squared gradient norm per parameter array (``forget_experts``: per expert,
    ``[N]``), taken before the optimizer, i.e. where the relearning signal flows.
    """
    from alter_jax.train.step import TrainState

    loss, grads = jax.value_and_grad(relearn_loss)(state.trainable, parts, ids, mask, labels, threshold,
                                                   graphdef=graphdef, gated=gated, q=q)
    grad_sq = {g: jax.tree_util.tree_map(
        (lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))) if g == "forget_experts"
        else (lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)))), tree) for g, tree in grads.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    return TrainState(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                      opt_state=opt_state), loss, grad_sq


def unit_sums(flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, float]:
    """Sum of per-array scalars (e.g. squared gradient norms from :func:`relearn_step`) per unit."""
    out: dict[str, float] = {}
    for path, arr in flat.items():
        for name, _, v in _units(path, np.asarray(arr)):
            out[name] = out.get(name, 0.0) + float(np.sum(v))
    return out


# ----------------------------------------------------------------------------- loading
@dataclasses.dataclass
class LoadedRun:
    run: Any  # config.RunConfig
    method: Any  # train.methods.MethodSpec
    model: Any  # the unlearned model (adapters installed for adapter runs)
    tokenizer: Any
    threshold: float
    forget: list[dict]
    retain: list[dict]


def _data_source(run, run_dir: Path) -> str:
    """The folder / hub id ``train.loop.load_rows`` reads the run's rows from."""
    if run.data.source == "demo":
        from alter_jax.demo import ensure_demo_model

        return str(ensure_demo_model(progress=False).parent / "data")
    if run.data.source == "synthetic":
        return str(run_dir / "data")
    return run.data.source


def _with_perturbed(rows: list[dict], run, run_dir: Path) -> list[dict]:
    """Attach ``paraphrased_answer`` / ``perturbed_answer`` from ``<forget_split>_perturbed`` by question."""
    if not rows or "question" not in rows[0] or all("perturbed_answer" in r for r in rows):
        return rows
    from alter_jax.data.tofu import load_tofu_split

    try:
        extra = load_tofu_split(f"{run.data.forget_split}_perturbed", _data_source(run, run_dir))
    except (OSError, ValueError, KeyError):  # no perturbed split for this source: truth ratio is reported as None
        return rows
    by_q = {r["question"]: r for r in extra}
    if not all(r["question"] in by_q for r in rows):
        return rows
    keys = ("paraphrased_answer", "perturbed_answer")
    return [{**r, **{k: by_q[r["question"]][k] for k in keys if k in by_q[r["question"]]}} for r in rows]


def load_run(run_dir: str | Path) -> LoadedRun:
    """The finished run's config, method, unlearned model, θ and its forget / retain rows."""
    from alter_jax import config as C
    from alter_jax.train.loop import load_rows, load_run_result
    from alter_jax.train.methods import get_method

    run_dir = Path(run_dir)
    model, tok, _, _ = load_run_result(run_dir)  # clear errors for a missing / unfinished run
    run = C.build(json.loads((run_dir / "config.json").read_text())["config"])
    method = get_method(run.train.method)
    threshold = run.entropy.value
    info = run_dir / "data_info.json"
    if info.is_file():
        threshold = float(json.loads(info.read_text()).get("threshold", threshold))
    forget, retain = load_rows(run.data, run_dir)
    return LoadedRun(run, method, model, tok, float(threshold), _with_perturbed(forget, run, run_dir), retain)


def resolve_mode(mode: str, method) -> str:
    """``auto`` -> ``adapter`` for ALTER / AsymLoRA (gated), ``lora`` (a fresh LoRA on the merged model) else."""
    if mode == "auto":
        return "adapter" if method.asymmetric else "lora"
    if mode == "adapter" and not method.adapter:
        raise ValueError(f"relearn: --mode adapter needs an adapter run; {method.name} is full-parameter "
                         "(use --mode full or --mode lora)")
    if mode == "lora" and method.asymmetric:
        raise ValueError(f"relearn: --mode lora is not defined for {method.name}: the entropy-gated model has no "
                         "merged form to put a LoRA on; use --mode adapter (its experts, router and A) or --mode full")
    return mode


def attack_model(loaded: LoadedRun, mode: str, cfg: RelearnConfig):
    """``(model, trainable groups, gated)`` for the attack (the model is a copy; ``loaded`` is untouched)."""
    from alter_jax.adapters.inject import add_adapters, count_params, merged_backbone
    from alter_jax.adapters.lora import AdapterConfig, GROUPS

    method = loaded.method
    model = nnx.clone(loaded.model)
    if method.asymmetric:
        present = tuple(g for g in ADAPTER_GROUPS if count_params(nnx.state(model, GROUPS[g])) > 0)
        return model, (present if mode == "adapter" else ("backbone", *present)), True
    if method.adapter and mode == "adapter":
        return model, ("shared_a", "retain_expert"), False
    if method.adapter:
        model = merged_backbone(model)
    if mode == "full":
        return model, ("backbone",), False
    add_adapters(model, AdapterConfig(rank=cfg.rank, alpha=cfg.alpha, num_forget_experts=0, use_router=False),
                 seed=cfg.seed)
    return model, ("shared_a", "retain_expert"), False


# ----------------------------------------------------------------------------- evaluation
def score_forget(logits_fn, generate_fn, tok, rows, fmt, max_length, batch_size, max_new_tokens) -> dict[str, Any]:
    """prob, ROUGE-L recall, truth ratios of ``rows`` (TOFU forget formulas, :mod:`alter_jax.eval.tofu`)."""
    from alter_jax.eval.tofu import evaluate_split, generate_answers, rouge_recall, score_answers, task_scores, truth_ratios

    if all("perturbed_answer" in r and "paraphrased_answer" in r for r in rows):
        log = evaluate_split(rows, "eval_log_forget", logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tok,
                             fmt=fmt, max_length=max_length, batch_size=batch_size, max_new_tokens=max_new_tokens)
        s = task_scores(log, "eval_log_forget")
        return {"prob": s["Prob."], "rouge_l_recall": s["ROUGE"], "truth_ratio": s["Truth Ratio"],
                "truth_ratio_mean_r": float(np.mean(truth_ratios(log, "eval_log_forget"))),
                "example_answer": log["generated_text"]["0"][1]}
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    nll, n = score_answers(logits_fn, tok, qs, ans, fmt=fmt, max_length=max_length, batch_size=batch_size)
    _, gens = generate_answers(generate_fn, tok, qs, fmt=fmt, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {"prob": float(np.mean(np.exp(-nll / n))), "rouge_l_recall": float(np.mean(rouge_recall(gens, ans)[1])),
            "truth_ratio": None, "truth_ratio_mean_r": None, "example_answer": gens[0] if gens else ""}


def _retain_prob(logits_fn, tok, rows, fmt, max_length, batch_size) -> float | None:
    from alter_jax.eval.tofu import score_answers

    if not rows:
        return None
    nll, n = score_answers(logits_fn, tok, [r["question"] for r in rows], [r["answer"] for r in rows], fmt=fmt,
                           max_length=max_length, batch_size=batch_size)
    return float(np.mean(np.exp(-nll / n)))


# ----------------------------------------------------------------------------- the attack
def relearn(
    run_dir: str | Path,
    cfg: RelearnConfig = RelearnConfig(),
    *,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    loaded: LoadedRun | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run the attack on a finished ``bin/unlearn`` folder; writes ``relearn_<mode>.json`` / ``.png``
    into ``out`` (default ``<run_dir>/relearn``) and returns the result (module docstring).

    ``loaded``: a :func:`load_run` result to reuse (it is not modified). ``reuse`` (a study stage):
    return the saved result instead of recomputing when ``relearn_<mode>.json`` exists with the
    same settings.
    """
    from alter_jax.config import OptimConfig
    from alter_jax.train.checkpoint import write_json_atomic
    from alter_jax.train.loop import model_eval_fns
    from alter_jax.train.optim import make_optimizer
    from alter_jax.train.prepare import encode
    from alter_jax.train.step import init_state, merge_model, split_model

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "relearn"
    if reuse and cfg.mode != "auto":
        prev = saved_result(out, cfg.mode, cfg)
        if prev is not None:
            return prev
    loaded = loaded or load_run(run_dir)
    run, method, tok = loaded.run, loaded.method, loaded.tokenizer
    if run.data.kind != "qa" or "question" not in (loaded.forget[0] if loaded.forget else {}):
        raise ValueError(f"relearn: {run_dir} unlearned plain text (data.kind={run.data.kind!r}); the attack scores "
                         "question/answer rows (TOFU-style runs)")
    mode = resolve_mode(cfg.mode, method)
    if reuse:
        prev = saved_result(out, mode, cfg)
        if prev is not None:
            return prev
    if "perturbed_answer" not in loaded.forget[0]:
        log(f"relearn: no {run.data.forget_split}_perturbed rows for this source: truth ratio not measured")
    lr = cfg.learning_rate(mode)
    fmt, max_length = run.model.prompt_format, run.model.max_length
    eval_bs = cfg.eval_batch_size or run.eval.batch_size
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else run.eval.max_new_tokens

    train_idx, eval_idx = split_rows(len(loaded.forget), cfg.train_frac, cfg.seed)
    if cfg.num_eval:
        eval_idx = eval_idx[: cfg.num_eval]
    train_rows = [loaded.forget[i] for i in train_idx]
    eval_rows = [loaded.forget[i] for i in eval_idx]
    retain_rows = loaded.retain[: (cfg.num_retain or len(eval_rows))]
    arrays = encode(tok, train_rows, fmt, max_length)

    model, groups, gated = attack_model(loaded, mode, cfg)
    graphdef, trainable, parts = split_model(model, groups)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # the step donates these; ``loaded`` shares the rest
    tx = make_optimizer({g: lr for g in groups}, OptimConfig(clip_norm=cfg.clip_norm))
    state = init_state(trainable, tx)
    start = flat_params(state.trainable)
    q, threshold = float(run.entropy.q), jnp.float32(loaded.threshold)
    log(f"relearn {run_dir} ({method.name}, mode {mode}{', gated forward' if gated else ''}): "
        f"train {len(train_rows)} / score {len(eval_rows)} forget rows, groups {', '.join(groups)}, lr {lr:g}, "
        f"k = {', '.join(map(str, cfg.steps))}")

    def evaluate(mdl):
        lf, gf = model_eval_fns(mdl, method, run.entropy, loaded.threshold)
        res = score_forget(lf, gf, tok, eval_rows, fmt, max_length, eval_bs, max_new)
        res["retain_prob"] = _retain_prob(lf, tok, retain_rows, fmt, max_length, eval_bs)
        return res

    base = None
    if cfg.reference:
        from alter_jax.generate import model_fns
        from alter_jax.train.loop import resolve_run_model
        from alter_jax.io.hf import load_pretrained

        base_model = (_detached(nnx.clone(loaded.model)) if method.adapter
                      else load_pretrained(resolve_run_model(run.model.name, progress=False), dtype=run.model.dtype))
        lf, gf = model_fns(base_model)
        base = score_forget(lf, gf, tok, eval_rows, fmt, max_length, eval_bs, max_new)

    from tqdm.auto import tqdm

    rows_out, losses, grad_sq = [], [], {}
    order, epoch = [], 0
    bar = tqdm(total=cfg.steps[-1], desc=f"relearn[{method.name}/{mode}]", disable=not progress, leave=False)
    for k in cfg.steps:
        while int(state.step) < k:
            if not order:
                order = list(np.random.default_rng([cfg.seed, epoch]).permutation(len(train_rows)))
                epoch += 1
            idx = np.resize(np.asarray(order[: cfg.batch_size]), cfg.batch_size)
            order = order[cfg.batch_size:]
            b = {key: jnp.asarray(arrays[key][idx]) for key in ("input_ids", "attention_mask", "labels")}
            state, loss, gsq = relearn_step(state, parts, b["input_ids"], b["attention_mask"], b["labels"], threshold,
                                            graphdef=graphdef, gated=gated, q=q, tx=tx)
            losses.append(float(loss))
            for u, v in unit_sums(flat_params(gsq)).items():
                grad_sq[u] = grad_sq.get(u, 0.0) + v
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
        mdl = merge_model(graphdef, state.trainable, parts)
        res = {"k": k, **evaluate(mdl), "train_loss": losses[-1] if losses else None}
        moved = parameter_changes(start, flat_params(state.trainable), per_layer_type=(k == cfg.steps[-1]))
        res["moved"] = {u: v["relative"] for u, v in moved.items() if u != "per_layer_type"}
        res["moved_delta_norm"] = {u: v["delta_norm"] for u, v in moved.items() if u != "per_layer_type"}
        total = sum(grad_sq.values())
        res["grad_share"] = {u: (v / total if total > 0 else None) for u, v in sorted(grad_sq.items())} if k else {}
        if k == cfg.steps[-1]:
            final_moved = moved
        rows_out.append(res)
    bar.close()

    p0 = rows_out[0]["prob"] if rows_out[0]["k"] == 0 else None  # recovery is measured from the unlearned model
    for r in rows_out:
        ok = base is not None and p0 is not None and abs(base["prob"] - p0) > 1e-12
        r["recovery"] = (r["prob"] - p0) / (base["prob"] - p0) if ok else None
    result = {
        "run": str(run_dir), "method": method.name, "mode": mode, "gated": gated, "trainable_groups": list(groups),
        "lr": lr, "config": dataclasses.asdict(cfg), "threshold": loaded.threshold,
        "split": {"train": [int(i) for i in train_idx], "eval": [int(i) for i in eval_idx], "seed": cfg.seed,
                  "train_frac": cfg.train_frac},
        "base": base, "schedule": rows_out, "moved_final": final_moved, "train_losses": losses,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json_atomic(out / f"relearn_{mode}.json", result)
    plot(result, out / f"relearn_{mode}.png")
    result["files"] = [str(out / f"relearn_{mode}.json"), str(out / f"relearn_{mode}.png")]
    log(table(result))
    return result


def saved_result(out: str | Path, mode: str, cfg: RelearnConfig) -> dict | None:
    """The result saved in ``out`` for ``mode`` if it was made with the settings ``cfg``, else ``None``."""
    f = Path(out) / f"relearn_{mode}.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return res if {k: v for k, v in res.get("config", {}).items() if k != "mode"} == \
        {k: v for k, v in want.items() if k != "mode"} else None


# ----------------------------------------------------------------------------- outputs
def _f(v) -> str:
    return "   n/a" if v is None else f"{v:6.3f}"


def table(result: dict) -> str:
    """Recovery per k (and the units the attack moved most) as a fixed-width text table."""
    units = sorted({u for r in result["schedule"] for u in r["moved"]})
    head = f"{'k':>4s} {'prob':>6s} {'ROUGE-L':>7s} {'TR':>6s} {'mean R':>6s} {'recov':>6s} {'retain':>6s}"
    head += "".join(f" {u[:16]:>16s}" for u in units)
    lines = [f"relearning attack on {result['run']} ({result['method']}, mode {result['mode']}"
             f"{', gated' if result['gated'] else ''}); TR = TOFU forget truth ratio, moved = ‖Δθ‖/‖θ‖", head]
    if result["base"]:
        b = result["base"]
        lines.append(f"{'base':>4s} {_f(b['prob'])} {_f(b['rouge_l_recall']):>7s} {_f(b['truth_ratio'])} "
                     f"{_f(b['truth_ratio_mean_r'])}")
    for r in result["schedule"]:
        line = (f"{r['k']:>4d} {_f(r['prob'])} {_f(r['rouge_l_recall']):>7s} {_f(r['truth_ratio'])} "
                f"{_f(r['truth_ratio_mean_r'])} {_f(r['recovery'])} {_f(r['retain_prob'])}")
        lines.append(line + "".join(f" {_f(r['moved'].get(u)):>16s}" for u in units))
    last = result["schedule"][-1]
    if last.get("grad_share"):
        lines.append(f"share of the squared loss gradient over the {last['k']} steps: "
                     + ", ".join(f"{u} {v:.3f}" for u, v in last["grad_share"].items() if v is not None))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = result["schedule"]
    ks = [r["k"] for r in sched]
    panels = [("prob", "forget answer prob (held out)"), ("rouge_l_recall", "ROUGE-L recall (held out)"),
              ("truth_ratio_mean_r", "mean truth ratio R (held out)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        vals = [r[key] if r[key] is not None else np.nan for r in sched]
        ax.plot(ks, vals, "o-", label="unlearned + k steps")
        if result["base"] and result["base"].get(key) is not None:
            ax.axhline(result["base"][key], color="k", ls="--", lw=1, label="before unlearning")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("relearning steps k")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ks, [str(k) for k in ks])
    axes[0].legend(fontsize=8)
    units = sorted({u for r in sched for u in r["moved"]})
    for u in units:
        axes[3].plot(ks, [r["moved"][u] if r["moved"].get(u) is not None else np.nan for r in sched], "o-", label=u)
    axes[3].set_title("relative parameter change ‖Δθ‖/‖θ‖", fontsize=9)
    axes[3].set_xlabel("relearning steps k")
    axes[3].set_xscale("symlog", linthresh=1)
    axes[3].set_xticks(ks, [str(k) for k in ks])
    axes[3].legend(fontsize=7)
    fig.suptitle(f"relearning attack: {result['method']} ({result['mode']}{', gated forward' if result['gated'] else ''})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
