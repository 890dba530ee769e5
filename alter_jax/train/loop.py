"""The unlearning run: config -> model + adapters -> batches -> step -> checkpoints -> report.

One loop for every method. Side effects (files, progress bar) stay here; the numerics
live in :mod:`alter_jax.train.step`. A run folder holds::

    config.json        the resolved config (a rerun with another config is refused)
    data_info.json     sizes, entropy threshold, sub-domains
    metrics.jsonl      one line per step
    checkpoints/       Orbax checkpoints (state + data position), atomic
    adapter/ | model/  the result (ALTER adapter, PEFT LoRA, or a full HF model)
    report.json        before/after metrics, wall time
    plots/             loss curves, entropy histogram

Restarting the same command resumes from the last checkpoint and ends with the same
parameters as an uninterrupted run (bitwise on CPU: data order is a function of
(seed, epoch) and the step is deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from alter_jax import config as C
from alter_jax.adapters.inject import add_adapters, count_params
from alter_jax.data.batching import (batch_indices, bucket_batch, bucket_dims, bucket_width, fill_batch,
                                     fill_indices, forget_retain_batches, forget_retain_index_batches, row_lengths,
                                     row_metadata, take)
from alter_jax.entropy import fit_threshold
from alter_jax.train.checkpoint import RunCheckpointer, write_json_atomic
from alter_jax.train.methods import IDK_LOSSES, MethodSpec, backbone_filter, get_method, uses_idk
from alter_jax.train.optim import group_learning_rates, make_optimizer, optimizer_key
from alter_jax.train.prepare import answer_token_values, backbone_statistics, encode, subdomain_experts
from alter_jax.train.step import Frozen, StepSettings, init_state, jit_train_step, split_model, term_counts

SIDES = ("forget", "retain")


class RunConflict(RuntimeError):
    """The output folder holds a run made with another config."""


class Diverged(RuntimeError):
    """A step gave a non-finite loss, gradient or parameter; the run stops before saving it."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _divergence_hint(run: C.RunConfig, lrs: dict, phase: str) -> str:
    rates = ", ".join(f"{g} {v:g}" for g, v in sorted(lrs.items()))
    low = "fp16 overflow (model.dtype float16) or " if "float16" in (run.model.dtype, run.model.param_dtype) else ""
    return (f"likely cause: {low}a learning rate too high for this model (phase {phase}: {rates}); lower the "
            "config.optim.lr* keys or set config.optim.clip_norm (e.g. 1.0)")


def collapse_warnings(before: dict, after: dict, run: C.RunConfig, lrs: dict) -> list[str]:
    """Finite but destroyed results (issue 14: lr 1e6 gave a model of uniform noise): the retain answer
    probability falling below half of its value before unlearning is reported, with the likely cause."""
    rb, ra = before["retain"]["answer_prob"], after["retain"]["answer_prob"]
    if not (np.isfinite(ra) and ra >= 0.5 * rb):
        return [f"retain answer prob fell from {rb:.4f} to {ra:.4f} (below half): the model lost what it should keep; "
                f"{_divergence_hint(run, lrs, 'main')}"]
    return []


def check_finite_step(metrics: dict[str, float], step: int, phase: str, run: C.RunConfig, lrs: dict,
                      ckpt: "RunCheckpointer | None", out: Path) -> None:
    """Stop a run whose step ``step`` gave a NaN / inf loss term or gradient norm (issue 14)."""
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if not bad:
        return
    first = [k for k in ("loss", "grad_norm") if k in bad] or sorted(bad)[:1]
    what = ", ".join(f"{k} = {bad[k]}" for k in first)
    if len(bad) > len(first):
        what += f" (and {', '.join(sorted(set(bad) - set(first)))})"
    last_good = ckpt.latest_step() if ckpt is not None else None
    raise Diverged(_diverged_message(f"step {step} ({phase}) gave a non-finite {what}", run, lrs, phase, last_good, out))


def _diverged_message(head: str, run, lrs, phase, last_good, out: Path) -> str:
    keep = (f"the last good checkpoint {out / 'checkpoints' / str(last_good)} is kept" if last_good is not None
            else "no checkpoint was saved before it")
    return (f"training diverged: {head}; {_divergence_hint(run, lrs, phase)}. The run stopped without saving the "
            f"diverged state or a result ({keep}); rerun in a new output_dir.")


# ----------------------------------------------------------------------------- loading
def load_model_and_tokenizer(spec: C.ModelSpec, progress: bool = True):
    from alter_jax.io.hf import load_pretrained, load_tokenizer, resolve_model_dir

    folder = resolve_run_model(spec.name, progress=progress)
    model = load_pretrained(folder, dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat,
                            scan_layers=spec.scan_layers,
                            attention_impl=None if spec.attention_impl == "auto" else spec.attention_impl)
    return model, load_tokenizer(folder), folder


def resolve_run_model(name: str, progress: bool = True) -> Path:
    """A model folder for a config's ``model.name`` (``demo-tiny`` builds the demo model once)."""
    from alter_jax.demo import DEMO_NAME, ensure_demo_model
    from alter_jax.io.hf import resolve_model_dir

    return ensure_demo_model(progress=progress) if name == DEMO_NAME else resolve_model_dir(name)


def resolve_data_source(data: C.DataConfig, output_dir: Path) -> str:
    """The folder or hub id behind ``data.source`` (``demo``: the demo world; ``synthetic``: written
    once into ``<output_dir>/data``)."""
    source = data.source
    if source == "demo":
        from alter_jax.demo import ensure_demo_model

        source = str(ensure_demo_model(progress=False).parent / "data")
    elif source == "synthetic":
        from alter_jax.data.synthetic import write_tofu_folder

        source = str(Path(output_dir) / "data")
        if not (Path(source) / "full.json").exists():
            write_tofu_folder(source, num_authors=data.synthetic_authors, forget_authors=data.synthetic_forget_authors,
                              seed=0)
    return source


def load_rows(data: C.DataConfig, output_dir: Path) -> tuple[list[dict], list[dict]]:
    """Forget and retain rows from a TOFU source (hub id, local folder or ``synthetic``)."""
    from alter_jax.data.tofu import load_tofu_split

    source = resolve_data_source(data, output_dir)
    if data.kind == "text":
        from alter_jax.data.corpus import load_text_split

        def load(names: str) -> list[dict]:  # "a,b": several corpora, each its own sub-domain
            parts = [n.strip() for n in names.split(",") if n.strip()]
            rows = [dict(r, domain=n) if len(parts) > 1 else r for n in parts for r in load_text_split(n, source)]
            return rows

        forget, retain = load(data.forget_split), load(data.retain_split)
    else:
        forget = load_tofu_split(data.forget_split, source)
        retain = load_tofu_split(data.retain_split, source)
    if data.num_forget:
        forget = forget[: data.num_forget]
    if data.num_retain:
        retain = retain[: data.num_retain]
    return forget, retain


# ----------------------------------------------------------------------------- evaluation
def answer_probability(logits_fn, arrays, batch_size: int = 8, length_bucket: int = 32) -> np.ndarray:
    """Per example ``exp(−mean answer-token NLL)`` (TOFU's forget/retain "Prob."); each batch is
    cut to its length bucket (right-padded rows)."""
    from alter_jax.eval.tofu import answer_nll

    out = []
    n, t = arrays["input_ids"].shape
    for s in range(0, n, batch_size):
        idx = np.resize(np.arange(s, min(n, s + batch_size)), batch_size)
        w = bucket_width(int(row_lengths(arrays["attention_mask"][idx]).max(initial=1)), length_bucket, t)
        logits = logits_fn(arrays["input_ids"][idx, :w], arrays["attention_mask"][idx, :w])
        total, count = answer_nll(logits, arrays["labels"][idx, :w])
        out.append(np.exp(-total / np.maximum(count, 1))[: min(n, s + batch_size) - s])
    return np.concatenate(out)


NUM_EXAMPLES = 3  # greedy answers kept per side in report.json (question, answer, generated)


def quick_eval(logits_fn, generate_fn, tokenizer, rows, arrays, fmt: str, ev: C.EvalConfig,
               length_bucket: int = 32, ppl_logits_fn=None) -> dict[str, Any]:
    """Answer probability and ROUGE-L recall of greedy answers on a set of rows, and their fluency
    (``eval.tofu.generation_fluency``: ``degenerate_rate``, ``rep_4``, ``distinct_1/2`` and, with
    ``ppl_logits_fn`` = the untouched backbone, ``generated_ppl``), with the first
    :data:`NUM_EXAMPLES` answers as ``examples``."""
    from alter_jax.eval.tofu import fluency_summary, generate_answers, generation_fluency, rouge_recall

    n = ev.num_questions or len(rows)
    rows, arrays = rows[:n], {k: v[:n] for k, v in arrays.items()}
    prob = answer_probability(logits_fn, arrays, ev.batch_size, length_bucket)
    if "question" not in rows[0]:  # text corpora: token probability only (MCQ / MUSE: bin/evaluate)
        return {"answer_prob": float(np.mean(prob)), "rouge_l_recall": float("nan"), "n": n, "example_answer": ""}
    _, gens, p_ids, g_ids = generate_answers(generate_fn, tokenizer, [r["question"] for r in rows], fmt,
                                             batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                             return_ids=True)
    rouge = rouge_recall(gens, [r["answer"] for r in rows])
    rouge = rouge[0] if isinstance(rouge, tuple) else rouge
    flu = fluency_summary(generation_fluency(gens, p_ids, g_ids, ppl_logits_fn, tokenizer, ev.batch_size))
    return {"answer_prob": float(np.mean(prob)), "rouge_l_recall": float(np.mean(rouge)), "n": n,
            "example_answer": gens[0] if gens else "", **flu,
            "examples": [{"question": r["question"], "answer": r["answer"], "generated": g}
                         for r, g in zip(rows[:NUM_EXAMPLES], gens)]}


def _idk_prob(logits_fn, arrays, run: C.RunConfig) -> float:
    """Mean answer probability of the forget questions' "I don't know" answers (first
    ``eval.num_questions`` rows, as :func:`quick_eval`)."""
    n = run.eval.num_questions or len(arrays["idk"]["input_ids"])
    sub = {k: v[:n] for k, v in arrays["idk"].items()}
    return float(np.mean(answer_probability(logits_fn, sub, run.eval.batch_size, run.model.length_bucket)))


def model_eval_fns(model, method: MethodSpec, entropy: C.EntropyConfig, threshold: float):
    """ALTER / AsymLoRA evaluate through the entropy-gated forward (Eq. 9); others directly."""
    from alter_jax.generate import model_fns

    if method.asymmetric:
        from alter_jax.gated import GateConfig, gated_model_fns

        return gated_model_fns(model, GateConfig(q=entropy.q, threshold=threshold, source=entropy.inference_source))
    return model_fns(model)


# ----------------------------------------------------------------------------- plan
def plan(run: C.RunConfig, device_bytes: int | None = None) -> dict[str, Any]:
    """Parameter counts per group and a memory estimate, without loading weights."""
    from alter_jax.io.hf import load_config
    from alter_jax.models.llama import Transformer

    method = get_method(run.train.method)
    folder = _config_folder(run.model.name)
    mcfg = load_config(folder, dtype=run.model.dtype, param_dtype=run.model.param_dtype)
    n_sub = run.data.num_subdomains or run.data.max_subdomains
    acfg = dataclasses.replace(run.adapter, num_forget_experts=n_sub if method.asymmetric else 0,
                               use_router=method.router)

    def build():
        m = Transformer(mcfg, rngs=nnx.Rngs(0))
        if method.adapter:
            add_adapters(m, acfg)
        return m

    abstract = nnx.eval_shape(build)
    _, trainable, frozen = split_model(abstract, method.trainable, backbone_filter(method, run.loss, mcfg.num_layers))
    counts = {g: count_params(s) for g, s in {**frozen, **trainable}.items() if g != "rest"}
    out = {"model": str(folder), "model_type": mcfg.model_type, "method": method.name, "param_counts": counts,
           "trainable": {g: count_params(s) for g, s in trainable.items()}}
    from alter_jax.plan import plan_memory

    sides = 3 if method.forget_loss == "idk_dpo" else 2  # IdkDPO's forward holds forget, retain and idk rows
    mem = plan_memory(mcfg, acfg, method, run.train.batch_size * sides, run.model.max_length, run.mesh,
                      device_bytes=device_bytes, remat=run.model.remat, head_chunk=run.model.head_chunk,
                      scan_layers=run.model.scan_layers)
    out["memory"] = mem.to_dict()
    out["memory_table"] = mem.table()
    return out


def _config_folder(name: str) -> Path:
    """A folder with the model's config.json, fetching only that file from the hub if needed."""
    from alter_jax.demo import DEMO_NAME, ensure_demo_model

    if name == DEMO_NAME:
        return ensure_demo_model()
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    from alter_jax.models.known import config_folder

    return config_folder(name)


# ----------------------------------------------------------------------------- the run
def preflight_model(run: C.RunConfig, method: MethodSpec, model) -> None:
    """Checks that need the model's layers, run before any expensive step (entropy pass, evaluation)."""
    if not method.adapter:
        return
    from alter_jax.models.llama import TARGET_MODULES, linear_layers

    paths = list(linear_layers(model))
    bad = [t for t in run.adapter.target_modules if not any(p == t or p.endswith("." + t) for p in paths)]
    if bad:
        raise C.ConfigValueError(f"config.adapter.target_modules {bad} match no layer of this model; valid module names "
                                 f"are {', '.join(TARGET_MODULES)} (or a dotted path such as layers.0.self_attn.q_proj).")


def preflight_rows(run: C.RunConfig, method: MethodSpec, rows: dict[str, list]) -> None:
    """Checks that need the rows, before the backbone pass."""
    n = len(rows["forget"])
    if not n or not rows["retain"]:
        empty = "forget" if not n else "retain"
        raise C.ConfigValueError(f"config.data.{empty}_split = {getattr(run.data, empty + '_split')!r} gives no rows; "
                                 "choose a split with rows.")
    if method.asymmetric and run.data.num_subdomains > n:
        raise C.ConfigValueError(f"config.data.num_subdomains = {run.data.num_subdomains} exceeds the {n} forget rows "
                                 f"of {run.data.forget_split!r}; each sub-domain needs rows: use at most {n} "
                                 "(0 = choose by silhouette).")


def entropy_split_report(entropies: np.ndarray, threshold: float, ent: C.EntropyConfig, method: MethodSpec) -> str:
    """One line: θ and the high-entropy fraction of answer tokens. A method that trains on both sets
    (ALTER) refuses an empty set, naming the quantile θ sits at and how to choose another threshold."""
    vals = np.asarray(entropies, np.float64)
    frac = float(np.mean(vals > threshold)) if vals.size else 0.0
    line = (f"entropy: θ = {threshold:.4g} ({ent.threshold}), high-entropy answer tokens {100 * frac:.1f} % of "
            f"{vals.size}")
    if method.entropy and (frac == 0.0 or frac == 1.0):
        at = float(np.mean(vals <= threshold)) if vals.size else 0.0
        qs = np.quantile(vals, [0.5, 0.7, 0.9]) if vals.size else np.zeros(3)
        side = "low" if frac == 1.0 else "high"
        raise C.ConfigValueError(
            f"config.entropy: θ = {threshold:.4g} sits at the {100 * at:.1f} % quantile of the {vals.size} answer-token "
            f"entropies S_{ent.q:g} (range {vals.min():.3g}..{vals.max():.3g}), so no token is {side}-entropy and "
            f"method {method.name!r} needs both sets. Choose another threshold: --config.entropy.threshold=quantile "
            f"--config.entropy.value=0.3 (top 30 % high), or a fixed θ such as --config.entropy.value="
            f"{qs[1]:.3g} (the 70 % quantile; 50 %: {qs[0]:.3g}, 90 %: {qs[2]:.3g}).")
    return line


def truncated_rows(arrays: dict, eos_id: int | None) -> np.ndarray:
    """Indices of encoded rows cut by ``max_length``: every position is real and the last token is not
    the EOS that ends a complete answer (``encode_qa`` appends it and truncates after)."""
    full = arrays["attention_mask"][:, -1] > 0
    if eos_id is not None:
        full &= arrays["input_ids"][:, -1] != eos_id
    return np.flatnonzero(full)


def check_truncation(run: C.RunConfig, rows: dict, arrays: dict, eos_id: int | None, log) -> dict[str, int]:
    """Count, warn about and (above :data:`config.TRUNCATION_LIMIT` of a side) refuse answers cut by
    ``model.max_length`` (issue 14: a short max_length silently scored and trained on cut answers)."""
    counts = {}
    for side in SIDES:
        cut = truncated_rows(arrays[side], eos_id)
        counts[side] = int(len(cut))
        if not len(cut):
            continue
        n = len(arrays[side]["input_ids"])
        frac = len(cut) / n
        msg = (f"config.model.max_length = {run.model.max_length} cuts the answers of {len(cut)} of {n} {side} rows "
               f"({100 * frac:.1f} %, e.g. row {int(cut[0])}: {rows[side][int(cut[0])]['question'][:50]!r})")
        if frac > C.TRUNCATION_LIMIT and not run.data.allow_truncation:
            raise C.ConfigValueError(f"{msg}; more than {100 * C.TRUNCATION_LIMIT:g} % is refused: raise max_length, or "
                                     "pass --config.data.allow_truncation=True to train and score on the cut answers")
        log(f"warning: {msg}; they train and score on the cut answer")
    return counts


def _finished_report(out: Path) -> dict | None:
    """The report of a finished run folder whose result is still there, else None."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    result = Path(report.get("result", ""))
    return report if result.name and result.exists() else None


def config_snapshot(run: C.RunConfig) -> dict:
    """What ``config.json`` of a run folder holds: the resolved config and its hash."""
    return {"config": C.to_dict(run), "hash": _config_hash(run)}


def config_diff(old: dict, new: dict, limit: int = 6) -> str:
    """``"optim.lr_b (0.001 there, 0.0005 now), ..."`` over the keys that enter the config hash."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v  # JSON gives lists for tuples
        return out

    a, b = flat(old), flat(new)
    skip = {"train.checkpoint_every", "train.log_every"}
    keys = [k for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)
            and not any(k == f"{sec}.{key}" and a.get(k, dft) == dft and b.get(k, dft) == dft
                        for (sec, key), dft in LATE_DEFAULTS.items())]
    fmt = lambda v: "unset" if v is None else repr(v)  # noqa: E731
    parts = [f"{k} ({fmt(a.get(k))} there, {fmt(b.get(k))} now)" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# keys added after run folders existed: at their default they stay out of the hash (older folders still resume)
LATE_DEFAULTS = {("data", "allow_truncation"): False, ("loss", "dpo_beta"): 0.1, ("loss", "forget_target"): "ihl",
                 ("loss", "forget_high_nll"): 0.0, ("loss", "ihl_margin"): 1.0}


def _config_hash(run: C.RunConfig) -> str:
    d = C.to_dict(run)
    for (section, key), default in LATE_DEFAULTS.items():
        if d[section].get(key, default) == default:
            d[section].pop(key, None)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("checkpoint_every", "log_every")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _settings(method, run, threshold, phase="main") -> StepSettings:
    return StepSettings(method=method, loss=run.loss, q=run.entropy.q, threshold=float(threshold), phase=phase,
                        head_chunk=run.model.head_chunk)


def _device_batch(batch: dict) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, batch)


def weighted_windows(items: Iterable[tuple[Any, Any]], k: int, counts_fn: Callable[[dict], dict],
                     start: int = 0, put: Callable[[float], Any] = np.float32) -> Iterator[tuple[Any, dict]]:
    """Token-weighted gradient accumulation (``optim.grad_accum = k``; ``train.step`` module doc).

    ``items``: ``(key, batch)`` for every micro-batch in training order, from the first
    (global index 0), each already cut to its bucket; ``batch`` may be a function that makes it
    (called only for the windows that are yielded, so a resume builds no skipped batch). Micro-batches are grouped in windows of
    ``k`` (the updates of ``optax.MultiSteps``, which counts from the same index 0); each
    batch of a window gets ``batch["weights"] = {term: k·c_i / Σ_j c_j}`` from
    ``counts_fn(batch)`` (:func:`alter_jax.train.step.term_counts`). Yields the items from index
    ``start`` on (a resume inside a window still weighs by the whole window); ``put`` makes each
    weight a step input (a host scalar, or a replicated global array under several processes).
    ``k = 1`` passes the batches through unchanged."""
    from alter_jax.train.step import accumulation_weights

    def made(b):
        return b() if callable(b) else b

    if k <= 1:
        for g, (key, b) in enumerate(items):
            if g >= start:
                yield key, made(b)
        return
    window: list[tuple[int, Any, Any]] = []

    def flush():
        if window[-1][0] < start:  # a window finished before the resume point
            return
        batches = [made(b) for _, _, b in window]
        counts = [{t: float(v) for t, v in counts_fn(_device_batch(b)).items()} for b in batches]
        for (g, key, _), b, w in zip(window, batches, accumulation_weights(counts)):
            if g >= start:
                yield key, {**b, "weights": {t: put(v) for t, v in w.items()}}

    for g, (key, batch) in enumerate(items):
        window.append((g, key, batch))
        if len(window) == k:
            yield from flush()
            window = []
    if window:  # a last, short window: MultiSteps will not apply it (the run's step count decides)
        yield from flush()


def unlearn(
    run: C.RunConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    interrupt_after_step: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) one unlearning job; returns the report (also written to report.json).

    ``interrupt_after_step`` simulates a crash right after that step's checkpoint (tests).
    """
    out = Path(run.output_dir)
    from alter_jax.sharding import initialize_distributed, is_main_process

    initialize_distributed()  # before any JAX computation; a no-op in a single process
    if out.exists() and not out.is_dir():
        raise C.ConfigValueError(f"config.output_dir = {run.output_dir!r} is a file, not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # process 0 holds the lock for the whole multi-process run (its peers share the folder)
        lock = run_lock(out) if is_main_process() else contextlib.nullcontext()
    except (PermissionError, FileNotFoundError, OSError) as e:
        raise C.ConfigValueError(f"config.output_dir = {run.output_dir!r} cannot be written ({e.strerror}: "
                                 f"{e.filename}); choose a folder you can write to") from None
    with lock:
        return _unlearn(run, out, progress=progress, log=log, interrupt_after_step=interrupt_after_step)


LOCK_FILE = ".lock"


def run_lock(out: Path):
    """An exclusive ``flock`` on ``<out>/.lock`` held for the whole run (released when the process ends,
    even on ``kill -9``); a second run into the same folder raises :class:`RunConflict` naming the
    holder's PID (issue 14: two runs interleaved metrics.jsonl). Returns a context manager."""
    import contextlib
    import fcntl
    import os

    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunConflict(f"{out} is in use by another run (PID {holder}); wait for it to finish, stop it, or choose "
                          "another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    @contextlib.contextmanager
    def held():
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    return held()


def _unlearn(run: C.RunConfig, out: Path, *, progress: bool, log: Callable[[str], None],
             interrupt_after_step: int | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    from alter_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache()  # a rerun or resume loads the compiled steps instead of compiling them
    snapshot = config_snapshot(run)
    if (out / "config.json").exists():
        prev = json.loads((out / "config.json").read_text())
        if prev.get("hash") != snapshot["hash"]:
            diff = config_diff(prev.get("config", {}), snapshot["config"])
            raise RunConflict(f"{out} holds a run with a different config: {diff or 'hash ' + str(prev.get('hash'))}; "
                              "rerun with the folder's values, choose a new output_dir, or delete the folder.")
        done = _finished_report(out)
        if done is not None:  # nothing to do: say so at once (issue 14: 47 s of loading and evaluating)
            log(f"{out} holds a finished run with this config (report.json, result {done['result']}); nothing to do. "
                "Choose a new output_dir to run again.")
            return done
    main = _main_process()
    if jax.process_count() > 1:
        log(f"process {jax.process_index()} of {jax.process_count()} ({jax.local_device_count()} of "
            f"{jax.device_count()} devices): " + ("writes the run files" if main else
                                                   "process 0 writes the run files; this one writes its checkpoint shards"))
    if main:
        write_json_atomic(out / "config.json", snapshot)
    method = get_method(run.train.method)

    # -- model, data, entropy, sub-domains (deterministic: recomputed on resume)
    model, tok, folder = load_model_and_tokenizer(run.model, progress)
    log(f"model {folder} ({model.cfg.model_type}, {model.cfg.num_params() / 1e6:.1f}M params), method {method.name}")
    bfilter = backbone_filter(method, run.loss, model.cfg.num_layers)  # RMU: a few MLP kernels; else None
    preflight_model(run, method, model)
    rows = dict(zip(SIDES, load_rows(run.data, out)))
    preflight_rows(run, method, rows)
    truncated = None  # text corpora are cut into max_length windows by design
    if run.data.kind == "text":
        from alter_jax.data.corpus import encode_texts

        arrays = {s: encode_texts(tok, rows[s], run.model.max_length) for s in SIDES}
    else:
        arrays = {s: encode(tok, rows[s], run.model.prompt_format, run.model.max_length) for s in SIDES}
        truncated = check_truncation(run, rows, arrays, tok.eos_token_id, log)
    idk_info = None
    if uses_idk(method, run.loss):  # IdkNLL / IdkDPO / ALTER forget_target="idk": forget questions, refusal answers
        from alter_jax.data.tofu import load_idk, pair_idk

        if run.data.kind != "qa":
            raise C.ConfigValueError(f"method {method.name} (loss.forget_target={run.loss.forget_target!r}) needs "
                                     "question/answer rows; data.kind='text' has no questions to answer 'I don't know'")
        source = resolve_data_source(run.data, out)
        rows["idk"] = pair_idk(rows["forget"], load_idk(source), run.train.seed)
        arrays["idk"] = encode(tok, rows["idk"], run.model.prompt_format, run.model.max_length)
        idk_info = {"file": str(Path(source) / "idontknow.jsonl"), "answers": len({r["answer"] for r in rows["idk"]})}
    embeddings = {}
    for s in arrays:  # entropy behind every token, NPO's / DPO's reference log-probability, answer embeddings
        stats = backbone_statistics(model, arrays[s], run.entropy.q, length_bucket=run.model.length_bucket)
        arrays[s]["entropy"], arrays[s]["ref_logp"], embeddings[s] = stats["entropy"], stats["ref_logp"], stats["embedding"]
    all_ent = np.concatenate([answer_token_values(arrays[s]) for s in SIDES])
    threshold = fit_threshold(run.entropy.threshold, all_ent, value=run.entropy.value, q=run.entropy.q,
                              vocab_size=model.cfg.vocab_size)
    log(entropy_split_report(all_ent, threshold, run.entropy, method))
    if method.asymmetric:
        experts, n_sub, sub_info = subdomain_experts(rows["forget"], embeddings["forget"], domain_field=run.data.domain_field,
                                                     num=run.data.num_subdomains, max_num=run.data.max_subdomains,
                                                     seed=run.train.seed)
    else:
        experts, n_sub, sub_info = np.zeros(len(rows["forget"]), np.int32), 0, {"source": "none"}
    arrays["forget"]["expert"] = experts
    arrays["retain"]["expert"] = np.zeros(len(rows["retain"]), np.int32)
    if "idk" in arrays:
        arrays["idk"]["expert"] = experts  # the same questions: the same sub-domain
    data_info = {"forget": len(rows["forget"]), "retain": len(rows["retain"]), "threshold": float(threshold),
                 "high_entropy_fraction": float(np.mean(all_ent > threshold)), "subdomains": sub_info,
                 "num_forget_experts": n_sub, "truncated_rows": truncated}
    if idk_info is not None:
        data_info["idk"] = idk_info
    # training sides: ALTER with forget_target="idk" trains its forget experts on the idk rows (in place of the
    # true answers); IdkNLL / IdkDPO get them as a third, row-aligned side
    train_forget = arrays["idk"] if method.asymmetric and "idk" in arrays else arrays["forget"]
    aligned = {"idk": arrays["idk"]} if method.forget_loss in IDK_LOSSES else None
    train_arrays = {"forget": train_forget, "retain": arrays["retain"], **(aligned or {})}  # what a step reads

    def train_batches(epoch: int):
        return forget_retain_batches(train_forget, arrays["retain"], run.train.batch_size, seed=run.train.seed,
                                     epoch=epoch, aligned=aligned)
    if main:
        write_json_atomic(out / "data_info.json", data_info)

    # -- before
    eval_rows = {s: rows[s] for s in SIDES}
    lf, gf = model_eval_fns(model, get_method("ga"), run.entropy, threshold)  # plain backbone
    before = {s: quick_eval(lf, gf, tok, eval_rows[s], arrays[s], run.model.prompt_format, run.eval,
                            run.model.length_bucket, ppl_logits_fn=lf) for s in SIDES}
    if "idk" in arrays:  # how likely the "I don't know" answers are (what IdkNLL / IdkDPO / ALTER-idk raise)
        before["forget"]["idk_prob"] = _idk_prob(lf, arrays, run)
    log(_table({"before": before}))

    # -- adapters
    if method.adapter:
        acfg = dataclasses.replace(run.adapter, num_forget_experts=n_sub if method.asymmetric else 0,
                                   use_router=method.router and method.asymmetric)
        add_adapters(model, acfg, seed=run.train.seed)
    reference = None  # NPO's reference needs no copy: its log-probabilities come from the pre-pass
    if not method.adapter and (method.forget_loss == "rmu" or method.retain_loss == "kl"
                               or run.loss.retain_loss == "kl"):
        reference = jax.tree_util.tree_map(jnp.copy, nnx.state(model, nnx.All(nnx.Param, bfilter or nnx.Param)))
    control = None
    if method.forget_loss == "rmu":
        from alter_jax.train.step import rmu_control

        control = rmu_control(model.cfg.hidden_size, run.loss.rmu_steering, run.train.seed)

    ckpt = RunCheckpointer(out / "checkpoints")
    metrics_file = out / "metrics.jsonl"
    steps_per_epoch = len(batch_indices(len(rows["forget"]), run.train.batch_size))
    total_steps = steps_per_epoch * run.train.epochs
    if run.train.max_steps:
        total_steps = min(total_steps, run.train.max_steps)

    # -- phase I (ALTER): A and a single head B_s on high-entropy tokens, then copy B_s to every expert
    graphdef, trainable, frozen_parts = split_model(model, method.trainable, bfilter)
    if "backbone" in trainable and count_params(trainable["backbone"]) == 0:
        raise C.ConfigValueError(f"config.loss.rmu_params = {run.loss.rmu_params!r} matches no backbone parameter; "
                                 "paths look like 'layers.5.mlp.down_proj.kernel'")
    if bfilter is not None:
        log(f"trainable backbone parameters: {count_params(trainable['backbone']):,} "
            f"({len(jax.tree_util.tree_leaves(trainable['backbone']))} arrays)")
    resumed = ckpt.latest_step()
    if method.phase1 and run.train.phase1_steps > 0 and resumed is None:
        trainable, frozen_parts = _phase1(model, method, run, arrays, threshold, progress, metrics_file)
        graphdef, trainable, frozen_parts = split_model(model, method.trainable, bfilter)

    frozen = Frozen(graphdef=graphdef, parts=frozen_parts, reference=reference, control=control)
    lrs = group_learning_rates(method, run.optim)
    tx = make_optimizer(lrs, run.optim)
    state = init_state(trainable, tx)
    position = {"epoch": 0, "batch": 0}
    if resumed is not None:
        state, meta, _ = ckpt.restore(state)
        position = {"epoch": meta["epoch"], "batch": meta["batch"]}
        log(f"resumed from {ckpt.directory / str(resumed)} (step {int(state.step)}, epoch {position['epoch']}, "
            f"batch {position['batch']})")
        if main:
            _truncate_metrics(metrics_file, int(state.step))
    elif metrics_file.exists() and not method.phase1 and main:
        metrics_file.unlink()

    # the step is jitted once, with explicit shardings over the configured device mesh
    from alter_jax.sharding import global_batch, make_mesh, process_batch_rows, shard_train_step

    mesh = make_mesh(run.mesh)
    n_rows = {s: len(arrays[s]["input_ids"]) for s in SIDES}
    meta = {s: row_metadata(v) for s, v in train_arrays.items()}
    settings = _settings(method, run, threshold)
    example = bucket_batch(fill_batch(next(train_batches(0)), run.train.batch_size), run.model.length_bucket)
    if run.optim.grad_accum > 1:  # the batch pytree then carries the accumulation weights
        example = {**example, "weights": {t: np.float32(1.0) for t in term_counts(_device_batch(example), settings)}}
    mine = process_batch_rows(mesh, run.train.batch_size)  # the rows of each global batch this process loads
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), example)
    step_fn, state, frozen, _ = shard_train_step(settings, tx, state, frozen, abstract_batch, mesh, place_batch=False,
                                                 reuse_key=optimizer_key(lrs, run.optim))
    bar = tqdm(total=total_steps, initial=int(state.step), desc=f"unlearn[{method.name}]", disable=not progress)
    t0, tokens = time.perf_counter(), 0
    done = int(state.step) >= total_steps

    def schedule():  # every micro-batch of phase II in order: ((epoch, index, rows), batch made on demand)
        for epoch in range(run.train.epochs):
            for b_idx, idx in enumerate(forget_retain_index_batches(n_rows["forget"], n_rows["retain"],
                                                                   run.train.batch_size, seed=run.train.seed,
                                                                   epoch=epoch)):
                idx = fill_indices(idx, run.train.batch_size)
                idx.update({name: idx["forget"] for name in aligned or {}})  # row-aligned with forget

                def make(idx=idx):  # this process's rows, cut to the global batch's bucket
                    dims = bucket_dims(meta, idx, run.model.length_bucket, run.model.max_length)
                    local = bucket_batch({s: take(v, idx[s][mine]) for s, v in train_arrays.items()},
                                         run.model.length_bucket, dims)
                    return global_batch(local, mesh, run.train.batch_size)
                yield (epoch, b_idx, idx), make

    counts_fn = jax.jit(functools.partial(term_counts, settings=settings))
    micro = weighted_windows(schedule(), run.optim.grad_accum, counts_fn, start=int(state.step),
                             put=lambda v: global_batch(np.float32(v), mesh, run.train.batch_size))
    for (epoch, b_idx, idx), batch in ([] if done else micro):
        state, m = step_fn(state, frozen, batch)
        step = int(state.step)
        tokens += int(sum(meta[s]["tokens"][idx[s]].sum() for s in SIDES))
        m = {k: float(v) for k, v in m.items()}
        check_finite_step(m, step, "main", run, lrs, ckpt, out)
        rate = tokens / (time.perf_counter() - t0)
        if main:
            _append_jsonl(metrics_file, {"step": step, "epoch": epoch, "phase": "main", **m, "tokens_per_s": rate})
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:.0f}")
        bar.update()
        last = step >= total_steps
        nxt = {"epoch": epoch, "batch": b_idx + 1}
        if step % run.train.checkpoint_every == 0 or last:
            if not bool(_all_finite(state.trainable)):  # finite step, but the update overflowed
                raise Diverged(_diverged_message(f"the update of step {step} made parameters non-finite", run, lrs,
                                                 "main", ckpt.latest_step(), out))
            ckpt.save(step, state, {**nxt, "seed": run.train.seed, "hash": snapshot["hash"]})
        if interrupt_after_step is not None and step == interrupt_after_step:
            raise KeyboardInterrupt(f"simulated interruption after step {step}")
        if last:
            done = True
            break
    bar.close()
    if not bool(_all_finite(state.trainable)):  # never export a non-finite result (resumed runs included)
        raise Diverged(f"training diverged: the parameters after step {int(state.step)} (checkpoint "
                       f"{ckpt.directory / str(ckpt.latest_step())}) are non-finite; {_divergence_hint(run, lrs, 'main')}. "
                       "No result was saved; rerun in a new output_dir.")

    # -- result
    trainable = state.trainable
    if jax.process_count() > 1:  # every process gets the whole trained state back on its host
        from jax.experimental import multihost_utils

        trainable = jax.tree_util.tree_map(jnp.asarray, multihost_utils.process_allgather(trainable, tiled=True))
    model = _rebuild(graphdef, trainable, frozen_parts)
    result_dir = _export(model, method, run, out, tok, threshold, data_info) if main else _result_dir(method, out)
    lf, gf = model_eval_fns(model, method, run.entropy, threshold)
    ppl_fn = None
    if run.data.kind == "qa":  # generated answers are scored by the untouched backbone
        from alter_jax.generate import model_fns

        if method.adapter:  # the frozen backbone itself, adapters detached (no second copy of the weights)
            from alter_jax.gated import _backbone

            ppl_fn = model_fns(_backbone(*nnx.split(model)))[0]
        else:  # full-parameter methods changed the weights: the model before unlearning, loaded again
            ppl_fn = model_fns(load_model_and_tokenizer(run.model, progress=False)[0])[0]
    after = {s: quick_eval(lf, gf, tok, eval_rows[s], arrays[s], run.model.prompt_format, run.eval,
                           run.model.length_bucket, ppl_logits_fn=ppl_fn) for s in SIDES}
    if "idk" in arrays:
        after["forget"]["idk_prob"] = _idk_prob(lf, arrays, run)
    warnings = collapse_warnings(before, after, run, lrs)
    for w in warnings:
        log(f"warning: {w}")
    report = {
        "method": method.name, "model": str(folder), "steps": int(state.step), "result": str(result_dir),
        "before": before, "after": after, "data": data_info, "learning_rates": lrs, "warnings": warnings,
        "trainable_params": {g: count_params(s) for g, s in state.trainable.items()},
        "wall_s": time.perf_counter() - t_start,
    }
    if main:
        write_json_atomic(out / "report.json", report)
        _plots(out, metrics_file, arrays, threshold)
    log(_table({"before": before, "after": after}))
    if jax.process_count() > 1:  # the peers leave once process 0 has written the result and report
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("alter_jax.unlearn.done")
    return report


def _phase1(model, method, run, arrays, threshold, progress, metrics_file):
    graphdef, trainable, frozen_parts = split_model(model, ("shared_a", "retain_expert"))
    frozen = Frozen(graphdef=graphdef, parts=frozen_parts, reference=None)
    lrs1 = group_learning_rates(method, run.optim, "phase1")
    tx = make_optimizer(lrs1, run.optim)
    state = init_state(trainable, tx)
    step_fn = jit_train_step(_settings(method, run, threshold, "phase1"), tx, reuse_key=optimizer_key(lrs1, run.optim))
    main = _main_process()
    if metrics_file.exists() and main:
        metrics_file.unlink()
    bar = tqdm(total=run.train.phase1_steps, desc="phase I", disable=not progress)
    settings = _settings(method, run, threshold, "phase1")

    def schedule():  # as many epochs as phase1_steps needs
        epoch = 0
        while True:
            for batch in forget_retain_batches(arrays["forget"], arrays["retain"], run.train.batch_size,
                                               seed=run.train.seed + 7919, epoch=epoch):
                yield epoch, bucket_batch(fill_batch(batch, run.train.batch_size), run.model.length_bucket)
            epoch += 1

    counts_fn = jax.jit(functools.partial(term_counts, settings=settings))
    for _, batch in weighted_windows(schedule(), run.optim.grad_accum, counts_fn):
        state, m = step_fn(state, frozen, _device_batch(batch))
        m = {k: float(v) for k, v in m.items()}
        check_finite_step(m, int(state.step), "phase1", run, lrs1, None, metrics_file.parent)
        if main:
            _append_jsonl(metrics_file, {"step": int(state.step), "phase": "phase1", **m})
        bar.update()
        if int(state.step) >= run.train.phase1_steps:
            break
    bar.close()
    nnx.update(model, *state.trainable.values())
    # every expert starts as a copy of B_s (spec §4)
    from alter_jax.adapters.inject import adapted_layers

    for lin in adapted_layers(model).values():
        ad = lin.adapter
        if ad.forget_experts is not None:
            ad.forget_experts[...] = jnp.broadcast_to(ad.retain_expert[...], ad.forget_experts[...].shape)
    return split_model(model, method.trainable)[1:]


def _rebuild(graphdef, trainable, frozen_parts):
    from alter_jax.train.step import merge_model

    return merge_model(graphdef, trainable, frozen_parts)


def _main_process() -> bool:
    from alter_jax.sharding import is_main_process

    return is_main_process()


def _result_dir(method, out: Path) -> Path:
    return out / ("adapter" if method.adapter else "model")


def _export(model, method, run, out: Path, tok, threshold, data_info) -> Path:
    if method.adapter:
        from alter_jax.io.alter import save_alter_adapter

        extra = {"method": method.name, "entropy": dataclasses.asdict(run.entropy), "threshold": float(threshold),
                 "base_model": run.model.name, "data": data_info}
        path = save_alter_adapter(model, out / "adapter", extra=extra)
        if not method.asymmetric:
            from alter_jax.io.peft import save_peft_adapter

            save_peft_adapter(model, out / "peft_adapter", base_model_name_or_path=run.model.name)
        return path
    from alter_jax.io.hf import save_pretrained

    return save_pretrained(model, out / "model", tokenizer=tok)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip()]
    keep = [l for l in rows if json.loads(l).get("phase") == "phase1" or json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in keep))


def _table(res: dict[str, dict[str, dict]]) -> str:
    def dg(side):
        v = side.get("degenerate_rate")
        return f"{v:9.3f}" if v is not None else f"{'-':>9s}"

    lines = [f"{'':8s} {'forget prob':>12s} {'forget ROUGE':>13s} {'forget deg':>10s} {'retain prob':>12s} "
             f"{'retain ROUGE':>13s} {'retain deg':>10s}"]
    for name, r in res.items():
        lines.append(f"{name:8s} {r['forget']['answer_prob']:12.4f} {r['forget']['rouge_l_recall']:13.4f} "
                     f"{dg(r['forget'])} {r['retain']['answer_prob']:12.4f} {r['retain']['rouge_l_recall']:13.4f} "
                     f"{dg(r['retain'])}")
    return "\n".join(lines)


def _plots(out: Path, metrics_file: Path, arrays, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    rows = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()] if metrics_file.exists() else []
    main = [r for r in rows if r.get("phase") == "main"]
    if main:
        keys = [k for k in main[0] if k not in ("step", "epoch", "phase", "tokens_per_s", "grad_norm", "high_frac")]
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            ax.plot([r["step"] for r in main], [r[k] for r in main], label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.set_title("training losses")
        fig.tight_layout()
        fig.savefig(out / "plots" / "loss.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in SIDES:
        ax.hist(answer_token_values(arrays[s]), bins=50, alpha=0.5, label=f"{s} tokens", density=True)
    ax.axvline(threshold, color="k", linestyle="--", label=f"θ = {threshold:.3f}")
    ax.set_xlabel("backbone token entropy S_q")
    ax.legend()
    ax.set_title("answer-token entropy")
    fig.tight_layout()
    fig.savefig(out / "plots" / "entropy_hist.png", dpi=100)
    plt.close(fig)


def load_run_result(run_dir: str | Path):
    """``(model, tokenizer, logits_fn, generate_fn)`` of a finished run folder.

    Adapter runs are rebuilt as backbone + adapter (ALTER / AsymLoRA evaluate through the
    entropy-gated forward with the run's fitted threshold); full-parameter runs load ``model/``.
    """
    from alter_jax.io.hf import load_pretrained, load_tokenizer

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.json); pass the output_dir of bin/unlearn")
    run = C.build(json.loads(cfg_file.read_text())["config"])
    method = get_method(run.train.method)
    if (run_dir / "model" / "config.json").is_file():
        model = load_pretrained(run_dir / "model", dtype=run.model.dtype)
        tok = load_tokenizer(run_dir / "model")
        lf, gf = model_eval_fns(model, method, run.entropy, 0.0)
        return model, tok, lf, gf
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir}: the run has no result yet (no adapter/ or model/); finish it with bin/unlearn")
    from alter_jax.io.alter import load_alter_adapter

    folder = resolve_run_model(run.model.name)
    model = load_pretrained(folder, dtype=run.model.dtype, param_dtype=run.model.param_dtype)
    model, extra = load_alter_adapter(model, run_dir / "adapter")
    lf, gf = model_eval_fns(model, method, run.entropy, float(extra.get("threshold", run.entropy.value)))
    return model, load_tokenizer(folder), lf, gf
