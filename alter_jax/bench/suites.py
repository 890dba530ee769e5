"""The three measurements of ``bin/bench`` (each returns result rows and ratio rows).

* :func:`bench_forward` (issue 2): tokens/s of the jitted JAX forward vs the transformers
  forward (float32, ``torch.no_grad``) on the same weights and batch ``[B, T]``.
* :func:`bench_steps`: one optimizer step of ALTER (struct penalty ``drift`` = the default,
  and ``none``), of AsymLoRA (A frozen: one pullback instead of ALTER's two), of plain LoRA (``lora_gd``) in JAX, and of PEFT LoRA in PyTorch
  (``get_peft_model`` with r=8 on the 7 linear layers; forward + loss + backward +
  ``AdamW.step``). The ``B`` rows of a step are ``B//2`` forget + ``B - B//2`` retain
  examples, so every variant processes the same ``[B, T]`` tokens.
* :func:`bench_generate`: entropy-gated generation (:func:`alter_jax.gated.gated_generate`:
  backbone prefill + gated prefill + Eq. 9 decode) vs generation with expert 0 merged into
  the weights (:func:`alter_jax.adapters.inject.merged_backbone` +
  :func:`alter_jax.generate.generate`); prompt ``[B, T]``, ``new_tokens`` generated, EOS off;
  also gated generation with ``GateConfig(prompt_entropy="zero")`` (no backbone prefill).

Rows are dicts: ``section, name, compile_s, median_s, tokens_per_s`` (+ ``spread``);
ratio rows: ``section, name, value, goal, met``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alter_jax.bench.timing import Timing, interleaved


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    folder: Path | None  # HF folder of forward / step / generate (None for mfu, which builds its own model)
    batch: int = 4
    seq: int = 128
    steps: int = 5
    warmup: int = 2
    rank: int = 8
    alpha: float = 16.0
    forget_experts: int = 2
    new_tokens: int = 32
    seed: int = 0


def _row(section: str, t: Timing, tokens: int) -> dict:
    return {"section": section, "name": t.name, "compile_s": t.warmup_s, "median_s": t.median_s,
            "tokens_per_s": tokens / t.median_s, "spread": t.spread, **{"times_s": t.times_s}}


def _ratio(section: str, name: str, value: float, goal: str | None = None) -> dict:
    met = None
    if goal:
        op, bound = goal.split()
        met = bool(value <= float(bound)) if op == "<=" else bool(value >= float(bound))
    return {"section": section, "name": name, "value": float(value), "goal": goal, "met": met}


def random_tokens(spec: BenchSpec, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(spec.seed)
    return rng.integers(3, vocab, (spec.batch, spec.seq)).astype(np.int32)


# ----------------------------------------------------------------------------- (0) forward
def bench_forward(spec: BenchSpec) -> tuple[list[dict], list[dict], dict]:
    import torch

    from alter_jax.bench.models import torch_model
    from alter_jax.io.hf import load_pretrained

    model = load_pretrained(spec.folder)
    ids = random_tokens(spec, model.cfg.vocab_size)
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    tm = torch_model(spec.folder)
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def torch_fwd():
        with torch.no_grad():
            return tm(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits

    fns = {"JAX forward (jit)": lambda: fwd(state, ids_j, mask_j).block_until_ready(), "PyTorch forward (no_grad)": torch_fwd}
    times = interleaved(fns, spec.steps, spec.warmup)
    diff = float(np.max(np.abs(np.asarray(fwd(state, ids_j, mask_j)) - torch_fwd().numpy())))
    tokens = spec.batch * spec.seq
    rows = [_row("forward", t, tokens) for t in times.values()]
    tj, tt = (times[k].median_s for k in fns)
    ratios = [_ratio("forward", "JAX / PyTorch forward tokens/s", tt / tj)]
    return rows, ratios, {"forward_max_abs_logit_diff": diff}


# ----------------------------------------------------------------------------- (a, b) train steps
def step_batch(spec: BenchSpec, vocab: int) -> dict:
    """Forget/retain halves of a ``[B, T]`` batch with labels (first quarter masked as the
    prompt), backbone entropies in [0.2, 2.5] on real tokens and forget experts in 1..N."""
    rng = np.random.default_rng(spec.seed + 1)
    n_f = spec.batch // 2
    sides = {}
    for side, n in (("forget", n_f), ("retain", spec.batch - n_f)):
        ids = rng.integers(3, vocab, (n, spec.seq)).astype(np.int32)
        labels = ids.copy()
        labels[:, : spec.seq // 4] = -100
        ent = rng.uniform(0.2, 2.5, (n, spec.seq)).astype(np.float32)
        ent[:, 0] = 0.0
        expert = rng.integers(1, spec.forget_experts + 1, n) if side == "forget" else np.zeros(n)
        sides[side] = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "entropy": ent,
                       "expert": expert.astype(np.int32)}
    return sides


def jax_stepper(backbone, spec: BenchSpec, method: str, struct_penalty: str, *, threshold: float = 1.2,
                retain_loss: str = "") -> Callable[[dict], object]:
    """``run(batch)``: one jitted train step of ``method`` on a copy of ``backbone`` with fresh
    adapters (state carried between calls), jitted with explicit shardings on a one-device mesh
    as the run loop does; ``batch`` is a forget/retain batch of numpy arrays."""
    from alter_jax.adapters.inject import add_adapters
    from alter_jax.adapters.lora import AdapterConfig
    from alter_jax.config import LossConfig, MeshConfig, OptimConfig
    from alter_jax.sharding import make_mesh, place, shard_train_step
    from alter_jax.train.methods import get_method
    from alter_jax.train.optim import group_learning_rates, make_optimizer
    from alter_jax.train.step import Frozen, StepSettings, init_state, split_model

    m = get_method(method)
    model = nnx.clone(backbone)
    if m.adapter:
        add_adapters(model, AdapterConfig(rank=spec.rank, alpha=spec.alpha,
                                          num_forget_experts=spec.forget_experts if m.asymmetric else 0,
                                          use_router=m.router and m.asymmetric), seed=spec.seed)
    graphdef, trainable, parts = split_model(model, m.trainable)
    frozen = Frozen(graphdef=graphdef, parts=parts)
    optim = OptimConfig()
    tx = make_optimizer(group_learning_rates(m, optim), optim)
    settings = StepSettings(method=m, loss=LossConfig(struct_penalty=struct_penalty, retain_loss=retain_loss), q=1.0,
                            threshold=threshold)
    box: dict = {}

    def run(batch):
        jbatch = jax.tree_util.tree_map(jnp.asarray, batch)
        if not box:  # jit and place on the first batch (its structure; later shapes retrace per bucket)
            step, state, fr, _ = shard_train_step(settings, tx, init_state(trainable, tx), frozen, jbatch,
                                                  make_mesh(MeshConfig()))
            box.update(step=step, state=state, frozen=fr)
        state, metrics = box["step"](box["state"], box["frozen"], jbatch)
        jax.block_until_ready((state, metrics))
        box["state"] = state
        return metrics

    return run


def jax_step_fn(backbone, spec: BenchSpec, method: str, struct_penalty: str, batch: dict) -> Callable[[], object]:
    """A closure running one jitted train step of ``method`` on the fixed ``batch``."""
    run = jax_stepper(backbone, spec, method, struct_penalty)
    return lambda: run(batch)


def peft_lora_step_fn(base, spec: BenchSpec, batch: dict) -> Callable[[], object]:
    """PEFT LoRA (r, alpha, dropout 0, the 7 projections) on ``base`` + AdamW: forward + loss +
    backward + step, on ``base``'s device (synchronised when that is CUDA)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alter_jax.models.llama import TARGET_MODULES

    dev = next(base.parameters()).device
    pm = get_peft_model(base, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                                         target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    cat = {k: torch.from_numpy(np.concatenate([batch["forget"][k], batch["retain"][k]]).astype(np.int64)).to(dev)
           for k in ("input_ids", "attention_mask", "labels")}

    def run():
        out = pm(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], labels=cat["labels"], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return run


def torch_lora_step_fn(spec: BenchSpec, batch: dict) -> Callable[[], object]:
    """The PyTorch route on the bench folder's weights (float32, CPU): :func:`peft_lora_step_fn`."""
    from alter_jax.bench.models import torch_model

    return peft_lora_step_fn(torch_model(spec.folder), spec, batch)


def bench_steps(spec: BenchSpec, *, with_torch: bool = True) -> tuple[list[dict], list[dict], dict]:
    from alter_jax.io.hf import load_pretrained

    backbone = load_pretrained(spec.folder)
    batch = step_batch(spec, backbone.cfg.vocab_size)
    names = {"alter": "JAX ALTER step (drift)", "alter_none": "JAX ALTER step (struct none)",
             "asym": "JAX AsymLoRA step (A frozen)", "lora": "JAX LoRA step", "torch": "PyTorch+PEFT LoRA step"}
    fns = {names["alter"]: jax_step_fn(backbone, spec, "alter", "drift", batch),
           names["alter_none"]: jax_step_fn(backbone, spec, "alter", "none", batch),
           names["asym"]: jax_step_fn(backbone, spec, "asymlora", "none", batch),
           names["lora"]: jax_step_fn(backbone, spec, "lora_gd", "drift", batch)}
    if with_torch:
        fns[names["torch"]] = torch_lora_step_fn(spec, batch)
    times = interleaved(fns, spec.steps, spec.warmup)
    tokens = spec.batch * spec.seq
    rows = [_row("train step", t, tokens) for t in times.values()]
    med = {k: times[v].median_s for k, v in names.items() if v in times}
    ratios = []
    if with_torch:
        ratios += [_ratio("train step", "(a) JAX ALTER / PyTorch LoRA time", med["alter"] / med["torch"], "<= 0.7"),
                   _ratio("train step", "(a) JAX LoRA / PyTorch LoRA time", med["lora"] / med["torch"])]
    ratios += [_ratio("train step", "(b) JAX ALTER / JAX LoRA time", med["alter"] / med["lora"], "<= 1.15"),
               _ratio("train step", "(b) JAX ALTER (struct none) / JAX LoRA time", med["alter_none"] / med["lora"]),
               _ratio("train step", "(b) JAX AsymLoRA / JAX LoRA time", med["asym"] / med["lora"])]
    return rows, ratios, {}


# ----------------------------------------------------------------------------- (c) generation
def bench_generate(spec: BenchSpec) -> tuple[list[dict], list[dict], dict]:
    from alter_jax.adapters.inject import adapted_layers, add_adapters, merged_backbone
    from alter_jax.adapters.lora import AdapterConfig
    from alter_jax.gated import GateConfig, gated_generate, gated_logits
    from alter_jax.generate import generate
    from alter_jax.io.hf import load_pretrained

    model = load_pretrained(spec.folder)
    add_adapters(model, AdapterConfig(rank=spec.rank, alpha=spec.alpha, num_forget_experts=spec.forget_experts),
                 seed=spec.seed)
    rng = np.random.default_rng(spec.seed + 2)
    for lin in adapted_layers(model).values():  # trained-looking experts (zeros would make every path equal)
        ad = lin.adapter
        ad.retain_expert[...] = jnp.asarray(rng.normal(0, 0.02, ad.retain_expert.shape), jnp.float32)
        ad.forget_experts[...] = jnp.asarray(rng.normal(0, 0.02, ad.forget_experts.shape), jnp.float32)
    ids = jnp.asarray(random_tokens(spec, model.cfg.vocab_size))
    mask = jnp.ones_like(ids)
    # θ = median backbone entropy of the prompt tokens: both Eq. 9 branches are exercised
    _, ent = gated_logits(model, ids, mask, GateConfig(threshold=0.0), return_entropy=True)
    theta = float(np.median(np.asarray(ent)[:, 1:]))
    gate = GateConfig(q=1.0, threshold=theta)
    zero = GateConfig(q=1.0, threshold=theta, prompt_entropy="zero")  # the measured departure: no backbone prefill
    merged = merged_backbone(model, 0)
    kw = dict(eos_token_ids=(-1,), pad_token_id=0)  # no EOS: every variant generates all tokens
    n = spec.new_tokens
    fns = {
        "gated generate (Eq. 9)": lambda: gated_generate(model, ids, mask, gate, n, **kw).tokens.block_until_ready(),
        "merged generate (expert 0)": lambda: generate(merged, ids, mask, max_new_tokens=n, **kw).tokens.block_until_ready(),
        "gated prefill only (1 new token)": lambda: gated_generate(model, ids, mask, gate, 1, **kw).tokens.block_until_ready(),
        "merged prefill only (1 new token)": lambda: generate(merged, ids, mask, max_new_tokens=1, **kw).tokens.block_until_ready(),
        "gated generate, prompt S = 0": lambda: gated_generate(model, ids, mask, zero, n, **kw).tokens.block_until_ready(),
    }
    times = interleaved(fns, spec.steps, spec.warmup)
    tokens = spec.batch * n
    rows = [_row("generate", t, tokens if "only" not in t.name else spec.batch) for t in times.values()]
    tg, tm, pg, pm, tz = (times[k].median_s for k in fns)
    ratios = [_ratio("generate", "(c) gated / merged generation tokens/s", tm / tg, ">= 0.9")]
    if n > 1 and tg > pg and tm > pm:
        ratios.append(_ratio("generate", "(c) gated / merged decode-only tokens/s", (tm - pm) / (tg - pg)))
    ratios.append(_ratio("generate", "(c) gated, prompt S = 0 (no backbone prefill) / merged", tm / tz))
    return rows, ratios, {"gate_threshold": theta, "new_tokens": n}


SUITES = {"forward": bench_forward, "step": bench_steps, "generate": bench_generate}
