"""Where ALTER's generated tokens route, and what each expert does there (issue 19 item 2).

A diagnostic of a finished ALTER / AsymLoRA run (``bin/evaluate routing --run R``), on the greedy
answers it gives to its forget and retain questions:

* **Trace** (:func:`routing_trace`). For every generated token ``t``: its entropy ``S_t`` exactly as
  decoding used it (prompt: backbone prefill; generated tokens: the gated model's own
  distribution, ``gate.source="self"`` with every generated position refined to the fixed point,
  which reproduces decoding; or the backbone's with ``generation_source="base"``), ``high = S > θ``,
  and in every adapted layer the Eq. 9 expert weights ``w [E]`` (captured from the layers
  themselves). Per token we keep: the share of adapted layers whose largest weight is a forget
  expert, the mean total forget weight, and the greedy next token of four models on the same
  prefix — the gated model (what was generated), the retain expert alone (``B_r`` in every
  layer), the row's forget expert alone and the backbone (no adapter). Summaries are split by
  side (forget / retain rows) and by high / low entropy; "letterless" = a token whose text has no
  letter (``.``, ``...``), the stuff degenerate answers are made of.
* **Settings grid** (:func:`settings_grid`). Inference-time knobs that need no retraining —
  ``adapter.retain_bias``, ``top_k``, ``tau_high``, and the entropy source of generated tokens
  (``self`` as the spec and today, ``base`` = the backbone's entropy, decoded here by recomputing
  the whole prefix at every step: slow, exact, a diagnostic only) — each scored like
  ``bin/unlearn``'s report: forget / retain answer probability (gated forward), greedy-answer
  ROUGE-L recall, degenerate rate and generated-answer perplexity under the backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alter_jax.adapters.lora import AsymLoRA, GatedRouting, HardRouting, gate_weights
from alter_jax.gated import GateConfig, _backbone, gated_logits, token_entropy_from_logits
from alter_jax.models.llama import linear_layers


def replace_adapter_fields(model, **changes) -> list[tuple[AsymLoRA, Any]]:
    """Replace fields of every asymmetric adapter's ``AdapterConfig`` in place (inference-time knobs:
    ``retain_bias``, ``top_k``, ``tau_high``, ``tau_low``; no retraining). Returns ``(adapter, old cfg)``."""
    old = [(lin.adapter, lin.adapter.cfg) for lin in linear_layers(model).values() if isinstance(lin.adapter, AsymLoRA)]
    for ad, cfg in old:
        ad.cfg = dataclasses.replace(cfg, **changes)
    return old


@contextlib.contextmanager
def adapter_settings(model, **changes):
    """Temporarily replace fields of every adapter's ``AdapterConfig`` (:func:`replace_adapter_fields`)."""
    old = replace_adapter_fields(model, **changes)
    try:
        yield model
    finally:
        for ad, cfg in old:
            ad.cfg = cfg


@contextlib.contextmanager
def capture_gate_weights(records: list):
    """Eager forwards append each adapted layer's Eq. 9 weights ``w [B, T, E]`` (in call order)."""
    original = AsymLoRA.__call__

    def probe(self, x, ctx):
        if isinstance(ctx, GatedRouting) and self.router is not None:
            z = self.router_logits(x, ctx.entropy).at[..., 0].add(self.cfg.retain_bias)
            records.append(np.asarray(gate_weights(z, ctx.high, self.cfg)))
        return original(self, x, ctx)

    AsymLoRA.__call__ = probe
    try:
        yield records
    finally:
        AsymLoRA.__call__ = original


@functools.partial(jax.jit, static_argnames=("graphdef", "q", "n_new"))
def _decode_base_entropy(graphdef, state, ids, mask, threshold, *, q, n_new):
    """Greedy gated decoding where every generated token's entropy is the *backbone's* (the whole
    prefix recomputed each step). ``ids, mask: [B, P + n_new]``, prompts left-padded in the first
    ``P`` columns, the rest zeros. Returns the filled ``ids``."""
    model = nnx.merge(graphdef, state)
    base = _backbone(graphdef, state)
    p = ids.shape[1] - n_new

    def step(i, carry):
        ids, mask = carry
        s = token_entropy_from_logits(base(ids, mask), q, mask)
        logits = model(ids, mask, adapter_ctx=GatedRouting(s, s > threshold))
        nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(ids.dtype)
        return ids.at[:, p + i].set(nxt), mask.at[:, p + i].set(1)

    return jax.lax.fori_loop(0, n_new, step, (ids, mask))[0]


def base_entropy_generate_fn(model, gate: GateConfig, eos_ids: Sequence[int], pad_id: int):
    """A ``GenerateFn`` (evaluation contract) decoding with backbone entropies for generated tokens."""
    graphdef, state = nnx.split(model)
    eos = set(int(e) for e in eos_ids)

    def generate_fn(input_ids, attention_mask, max_new_tokens: int) -> np.ndarray:
        b, p = input_ids.shape
        ids = np.concatenate([np.asarray(input_ids), np.full((b, max_new_tokens), pad_id)], 1).astype(np.int32)
        mask = np.concatenate([np.asarray(attention_mask), np.zeros((b, max_new_tokens))], 1).astype(np.int32)
        out = np.array(_decode_base_entropy(graphdef, state, ids, mask, jnp.float32(gate.threshold), q=gate.q,
                                              n_new=int(max_new_tokens)))[:, p:]
        for r in range(b):  # tokens after the first EOS are padding (as generate)
            hit = [k for k, t in enumerate(out[r]) if int(t) in eos]
            if hit:
                out[r, hit[0] + 1:] = pad_id
        return out

    return generate_fn


def _greedy_under(model, ids, mask, ctx):
    return np.asarray(jnp.argmax(model(jnp.asarray(ids), jnp.asarray(mask), adapter_ctx=ctx), -1))


def routing_trace(model, tokenizer, gate: GateConfig, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]],
                  sides: Sequence[str], forget_expert: Sequence[int], generation_source: str = "self",
                  batch_size: int = 8) -> list[dict[str, Any]]:
    """One record per generated token (module docstring). ``prompts`` / ``generated``: token ids per
    row (the prompt the model saw, its greedy answer cut at EOS); ``sides``: "forget" / "retain";
    ``forget_expert``: the forget expert (1..N) whose solo prediction is compared for each row."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recs: list[dict[str, Any]] = []
    base = _backbone(*nnx.split(model))
    for s0 in range(0, len(prompts), batch_size):
        rows = list(range(s0, min(len(prompts), s0 + batch_size)))
        seqs = [list(prompts[r]) + list(generated[r]) for r in rows]
        width = max(len(x) for x in seqs)
        width = -(-width // 16) * 16
        ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros_like(ids)
        gen_mask = np.zeros(ids.shape, bool)
        for k, (r, seq) in enumerate(zip(rows, seqs)):  # left padding, as generation
            ids[k, width - len(seq):] = seq
            mask[k, width - len(seq):] = 1
            gen_mask[k, width - len(generated[r]):] = True
        if generation_source == "base":
            _, s = gated_logits(model, ids, mask, dataclasses.replace(gate, source="base"), return_entropy=True)
        else:
            _, s = gated_logits(model, ids, mask, dataclasses.replace(gate, source="self", self_iters=None),
                                self_mask=gen_mask, return_entropy=True)
        s = np.asarray(s)
        high = s > gate.threshold
        records: list = []
        with capture_gate_weights(records):
            gated_next = _greedy_under(model, ids, mask, GatedRouting(jnp.asarray(s), jnp.asarray(high)))
        w = np.stack(records, 0)  # [layers, B, T, E]
        top_forget = (np.argmax(w, -1) > 0).mean(0)  # share of layers whose top expert is a forget expert
        forget_weight = w[..., 1:].sum(-1).mean(0)
        retain_next = _greedy_under(model, ids, mask, HardRouting(expert=jnp.zeros(len(rows), jnp.int32)))
        fexp = jnp.asarray([int(forget_expert[r]) for r in rows], jnp.int32)
        forget_next = _greedy_under(model, ids, mask, HardRouting(expert=fexp))
        base_next = np.asarray(jnp.argmax(base(jnp.asarray(ids), jnp.asarray(mask)), -1))
        for k, r in enumerate(rows):
            n = len(generated[r])
            for j in range(n):
                t = width - n + j  # position of generated token j; it was predicted at t - 1
                text = tokenizer.decode([int(ids[k, t])], skip_special_tokens=False)
                recs.append({
                    "row": r, "side": sides[r], "index": j, "token": text,
                    "letterless": not any(c.isalpha() for c in text), "entropy": float(s[k, t]), "high": bool(high[k, t]),
                    "top_forget_share": float(top_forget[k, t]), "forget_weight": float(forget_weight[k, t]),
                    "same_as_retain_expert": bool(retain_next[k, t - 1] == ids[k, t]),
                    "same_as_forget_expert": bool(forget_next[k, t - 1] == ids[k, t]),
                    "same_as_backbone": bool(base_next[k, t - 1] == ids[k, t]),
                })
    return recs


def summarize_trace(recs: Sequence[dict]) -> dict[str, Any]:
    """Means of the per-token records by side and by high / low entropy: ``{side: {"all" | "high" |
    "low": {"tokens", "high_share", "letterless", "top_forget_share", "forget_weight",
    "same_as_retain_expert", "same_as_forget_expert", "same_as_backbone", "entropy"}}}``."""
    keys = ("letterless", "top_forget_share", "forget_weight", "same_as_retain_expert", "same_as_forget_expert",
            "same_as_backbone", "entropy")
    out: dict[str, Any] = {}
    for side in sorted({r["side"] for r in recs}):
        part = [r for r in recs if r["side"] == side]
        out[side] = {}
        for name, sel in (("all", part), ("high", [r for r in part if r["high"]]), ("low", [r for r in part if not r["high"]])):
            d: dict[str, Any] = {"tokens": len(sel)}
            if sel:
                d["high_share"] = float(np.mean([r["high"] for r in sel]))
                d.update({k: float(np.mean([float(r[k]) for r in sel])) for k in keys})
            out[side][name] = d
        first = [r for r in part if r["index"] == 0]  # the answer's first token: where degeneration starts
        if first:
            out[side]["first_token"] = {"tokens": len(first), "high_share": float(np.mean([r["high"] for r in first])),
                                        "letterless": float(np.mean([r["letterless"] for r in first])),
                                        "top_forget_share": float(np.mean([r["top_forget_share"] for r in first]))}
    return out


DEFAULT_GRID = (
    ("as trained", {}),
    ("retain_bias=0", {"retain_bias": 0.0}),
    ("retain_bias=4", {"retain_bias": 4.0}),
    ("top_k=1", {"top_k": 1}),
    ("top_k=2", {"top_k": 2}),
    ("tau_high=0.3", {"tau_high": 0.3}),
    ("tau_high=2.0", {"tau_high": 2.0}),
    ("generation entropy = base", {"generation_source": "base"}),
)


def parse_settings(text: str) -> tuple[tuple[str, dict], ...]:
    """``"retain_bias=0;top_k=1+tau_high=2;generation_source=base"`` -> a grid: settings separated by
    ``;``, changes within one by ``+``; "as trained" always comes first."""
    grid = [("as trained", {})]
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        changes = {}
        for kv in part.split("+"):
            k, sep, v = kv.partition("=")
            if not sep:
                raise ValueError(f"--settings {part!r}: expected key=value (e.g. retain_bias=0, top_k=1, tau_high=2, "
                                 "generation_source=base)")
            k = k.strip()
            if k not in ("retain_bias", "top_k", "tau_high", "tau_low", "generation_source"):
                raise ValueError(f"--settings: unknown key {k!r}; choose retain_bias, top_k, tau_high, tau_low or "
                                 "generation_source")
            changes[k] = v.strip() if k == "generation_source" else (int(v) if k == "top_k" else float(v))
        grid.append((part, changes))
    return tuple(grid)


def evaluate_setting(model, tok, gate: GateConfig, rows: dict, arrays: dict, fmt: str, ev, length_bucket: int,
                     ppl_fn, changes: dict) -> dict[str, Any]:
    """``bin/unlearn``-style forget / retain figures of the gated model under ``changes``."""
    from alter_jax.gated import gated_model_fns
    from alter_jax.train.loop import quick_eval

    changes = dict(changes)
    source = changes.pop("generation_source", "self")
    with adapter_settings(model, **changes):
        lf, gf = gated_model_fns(model, gate)
        if source == "base":
            gf = base_entropy_generate_fn(model, gate, model.cfg.eos_token_ids or (tok.eos_token_id,),
                                          tok.pad_token_id if tok.pad_token_id is not None else 0)
        res = {s: quick_eval(lf, gf, tok, rows[s], arrays[s], fmt, ev, length_bucket, ppl_logits_fn=ppl_fn)
               for s in ("forget", "retain")}
    return {s: {k: v for k, v in r.items() if k != "example_answer"} for s, r in res.items()}


def run_routing_diagnostic(run_dir: str | Path, *, num_questions: int = 0, grid=DEFAULT_GRID,
                           out: str | Path | None = None, log=print, sources=("self", "base")) -> dict[str, Any]:
    """The trace (both entropy sources) and the settings grid of a finished ALTER / AsymLoRA run;
    writes ``<out or run>/routing.json`` and returns it."""
    from alter_jax import config as C
    from alter_jax.eval.tofu import generate_answers
    from alter_jax.generate import model_fns
    from alter_jax.train.loop import load_model_and_tokenizer, load_rows, load_run_result
    from alter_jax.train.methods import get_method
    from alter_jax.train.prepare import encode

    run_dir = Path(run_dir)
    run = C.build(json.loads((run_dir / "config.json").read_text())["config"])
    if not get_method(run.train.method).asymmetric:
        raise ValueError(f"{run_dir}: method {run.train.method!r} has no router; the routing diagnostic is for "
                         "ALTER / AsymLoRA runs")
    info = json.loads((run_dir / "data_info.json").read_text())
    model, tok, _, _ = load_run_result(run_dir)
    gate = GateConfig(q=run.entropy.q, threshold=float(info["threshold"]), source=run.entropy.inference_source)
    ppl_fn = model_fns(load_model_and_tokenizer(run.model, progress=False)[0])[0]
    forget, retain = load_rows(run.data, run_dir)
    n = num_questions or run.eval.num_questions or len(forget)
    rows = {"forget": forget[:n], "retain": retain[:n]}
    arrays = {s: encode(tok, rows[s], run.model.prompt_format, run.model.max_length) for s in rows}
    fmt, ev = run.model.prompt_format, dataclasses.replace(run.eval, num_questions=n)
    # the row's forget expert: its sub-domain (k-means on the backbone answer embeddings, as training)
    from alter_jax.train.prepare import backbone_statistics, subdomain_experts

    base_model = load_model_and_tokenizer(run.model, progress=False)[0]
    emb = backbone_statistics(base_model, encode(tok, forget, fmt, run.model.max_length), run.entropy.q,
                              length_bucket=run.model.length_bucket)["embedding"]
    experts = subdomain_experts(forget, emb, domain_field=run.data.domain_field, num=run.data.num_subdomains,
                                max_num=run.data.max_subdomains, seed=run.train.seed)[0][:n]
    result: dict[str, Any] = {"run": str(run_dir), "threshold": gate.threshold, "n": n, "trace": {}, "grid": {},
                              "examples": {}}
    from alter_jax.gated import gated_model_fns

    for source in sources:
        if source == "self":
            gf = gated_model_fns(model, gate)[1]
        else:
            gf = base_entropy_generate_fn(model, gate, model.cfg.eos_token_ids or (tok.eos_token_id,),
                                          tok.pad_token_id if tok.pad_token_id is not None else 0)
        prompts, gens, sides, fexp = [], [], [], []
        for side in ("forget", "retain"):
            _, texts, p_ids, g_ids = generate_answers(gf, tok, [r["question"] for r in rows[side]], fmt,
                                                      batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                                      return_ids=True)
            prompts += p_ids
            gens += g_ids
            sides += [side] * len(p_ids)
            fexp += list(experts) if side == "forget" else [1] * len(p_ids)
            result["examples"][f"{side} ({source})"] = texts[:3]
        recs = routing_trace(model, tok, gate, prompts, gens, sides, fexp, generation_source=source,
                             batch_size=ev.batch_size)
        result["trace"][source] = summarize_trace(recs)
        log(f"trace ({source} entropy for generated tokens): " + json.dumps(result["trace"][source]["forget"]["all"]))
    for name, changes in grid:
        result["grid"][name] = evaluate_setting(model, tok, gate, rows, arrays, fmt, ev, run.model.length_bucket,
                                                ppl_fn, changes)
        f, r = result["grid"][name]["forget"], result["grid"][name]["retain"]
        log(f"{name:28s} forget prob {f['answer_prob']:.3f} deg {f['degenerate_rate']:.3f} ROUGE {f['rouge_l_recall']:.3f}"
            f" | retain prob {r['answer_prob']:.3f} deg {r['degenerate_rate']:.3f} ROUGE {r['rouge_l_recall']:.3f}")
    dest = Path(out) if out else run_dir
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "routing.json").write_text(json.dumps(result, indent=2))
    return result
