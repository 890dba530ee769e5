"""``bin/bench --what epoch``: one unlearning epoch on the SmolLM2 study's rows, three trainers.

Sides, on the same model weights and the same forget/retain pairing and order
(``data.batching.forget_retain_batches`` with the study's seed and batch size):

* **ours, LoRA-GD** and **ours, ALTER**: batches exactly as ``bin/unlearn`` makes them
  (``fill_batch`` + ``bucket_batch``: cut to the length bucket, scored-token head), the
  backbone pre-pass (entropy, NPO reference) done once before, the step jitted with explicit
  shardings on a one-device mesh as the run loop does;
* **transformers + PEFT LoRA-GD**: LoRA r=8, alpha=16 on every linear layer, AdamW, each side
  of a batch padded to its own longest row (open-unlearning's collator), loss
  ``−NLL(forget) + NLL(retain)`` (:func:`torch_lora_gd_stepper`).

The epoch runs twice. The first pass compiles every length bucket our sides meet (reported
as ``first_epoch_s``); the second is timed step by step, the three sides interleaved (their
order rotates each step), and gives the ratios. ``first_step_s`` / ``first_step_warm_s``:
the first ALTER step (trace + compile + run) in a fresh process with an empty persistent
compilation cache, then in a second process with the cache the first one wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from alter_jax.config import ModelSpec

SIDES = ("forget", "retain")


# ----------------------------------------------------------------------------- data
def study_arrays(tokenizer, tofu_dir: str | os.PathLike) -> tuple[dict, dict]:
    """The SmolLM2 study's training rows (``study.tofu_smollm2.build_data`` at its default scale),
    encoded as ``bin/unlearn`` encodes them. Returns ``(arrays {side: {key: [N, T]}}, study settings)``."""
    import dataclasses

    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.study.tofu_smollm2 import StudyConfig, build_data
    from alter_jax.train.prepare import encode

    cfg = StudyConfig(tofu_dir=str(tofu_dir))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"  # build_data also writes data_val beside it
        build_data(cfg, data)
        rows = {s: load_tofu_split(s, str(data)) for s in SIDES}
    arrays = {s: encode(tokenizer, rows[s], "auto", cfg.max_length) for s in SIDES}
    return arrays, dataclasses.asdict(cfg)


def torch_side(side: dict) -> dict:
    """A right-padded side of a batch cut to its longest row (PyTorch's collator), int64 tensors."""
    import torch

    from alter_jax.data.batching import row_lengths

    width = int(row_lengths(side["attention_mask"]).max())
    return {k: torch.from_numpy(np.asarray(side[k][:, :width], np.int64)) for k in ("input_ids", "attention_mask", "labels")}


def torch_lora_gd_stepper(model, lr: float, rank: int = 8, alpha: float = 16.0) -> Callable[[dict], float]:
    """``run(batch) -> loss``: one transformers + PEFT LoRA-GD step (``−NLL(forget) + NLL(retain)``,
    one forward per side, each padded to its longest row, AdamW) on ``model``."""
    import torch
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)

    def run(batch) -> float:
        f, r = torch_side(batch["forget"]), torch_side(batch["retain"])
        loss = -pm(**f).loss + pm(**r).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return run


def _prepare(model, arrays: dict, study: dict) -> tuple[dict, float, int]:
    """Backbone pre-pass (entropy, NPO reference), the study's quantile threshold, sub-domains."""
    from alter_jax.entropy import fit_threshold
    from alter_jax.train.prepare import answer_token_values, backbone_statistics, subdomain_experts

    emb = {}
    for s in SIDES:
        st = backbone_statistics(model, arrays[s], 1.0)
        arrays[s]["entropy"], arrays[s]["ref_logp"], emb[s] = st["entropy"], st["ref_logp"], st["embedding"]
    values = np.concatenate([answer_token_values(arrays[s]) for s in SIDES])
    threshold = fit_threshold("quantile", values, value=study["alter_threshold"], q=1.0,  # as the study's runs
                              vocab_size=model.cfg.vocab_size)
    experts, n_sub, _ = subdomain_experts([{} for _ in emb["forget"]], emb["forget"], domain_field="domain", num=2,
                                          max_num=2, seed=study["seed"])
    arrays["forget"]["expert"] = experts
    arrays["retain"]["expert"] = np.zeros(len(arrays["retain"]["input_ids"]), np.int32)
    return arrays, float(threshold), n_sub


def epoch_batches(arrays: dict, study: dict, length_bucket: int) -> list[tuple[dict, dict]]:
    """``(ours, raw)`` per step of epoch 0: our bucketed batch and the raw (right-padded) one."""
    from alter_jax.data.batching import bucket_batch, fill_batch, forget_retain_batches

    out = []
    for b in forget_retain_batches(arrays["forget"], arrays["retain"], study["unlearn_batch"], seed=study["seed"]):
        out.append((bucket_batch(fill_batch(b, study["unlearn_batch"]), length_bucket), b))
    return out


# ----------------------------------------------------------------------------- first step in a fresh process
def first_alter_step(folder: str, tofu_dir: str, length_bucket: int) -> dict:
    """Time the first ALTER step of the epoch (trace + compile + run) in this process."""
    from alter_jax.bench.suites import BenchSpec, jax_stepper
    from alter_jax.compile_cache import enable_compilation_cache
    from alter_jax.io.hf import load_pretrained, load_tokenizer

    cache = enable_compilation_cache()
    model = load_pretrained(folder, scan_layers=ModelSpec().scan_layers)  # as bin/unlearn loads it
    arrays, study = study_arrays(load_tokenizer(folder), tofu_dir)
    arrays, threshold, n_sub = _prepare(model, arrays, study)
    ours, _ = epoch_batches(arrays, study, length_bucket)[0]
    step = jax_stepper(model, BenchSpec(folder=Path(folder), forget_experts=n_sub), "alter", "drift", threshold=threshold)
    t0 = time.perf_counter()
    step(ours)
    return {"first_step_s": time.perf_counter() - t0, "cache": str(cache)}


def _first_step_subprocess(folder: Path, tofu_dir: str, length_bucket: int, cache: Path) -> float:
    env = {**os.environ, "ALTER_JAX_COMPILATION_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": ""}
    cmd = [sys.executable, "-m", "alter_jax.bench.epoch", "--first-step", str(folder), tofu_dir, str(length_bucket)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"first-step subprocess failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["first_step_s"])


# ----------------------------------------------------------------------------- the benchmark
def bench_epoch(spec, *, with_torch: bool = True, tofu_dir: str | None = None, length_bucket: int = 32,
                first_step: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Rows, ratio rows and extra figures (see the module docstring and ``bin/bench --help``)."""
    import torch

    from alter_jax.bench.suites import BenchSpec, _ratio, jax_stepper
    from alter_jax.io.hf import load_pretrained, load_tokenizer

    from alter_jax.bench.models import torch_model

    tofu_dir = tofu_dir or str(Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu")
    if not (Path(tofu_dir) / "forget01.json").is_file():
        raise FileNotFoundError(f"--tofu-dir {tofu_dir}: no TOFU data (forget01.json); point it at shared/data/tofu")
    model = load_pretrained(spec.folder, scan_layers=ModelSpec().scan_layers)  # as bin/unlearn loads it
    arrays, study = study_arrays(load_tokenizer(spec.folder), tofu_dir)
    arrays, threshold, n_sub = _prepare(model, arrays, study)
    batches = epoch_batches(arrays, study, length_bucket)
    bspec = BenchSpec(folder=spec.folder, forget_experts=n_sub, rank=8, alpha=16.0)
    sides: dict[str, Callable] = {
        "ours LoRA-GD": (lambda run: lambda b: run(b[0]))(jax_stepper(model, bspec, "lora_gd", "drift")),
        "ours ALTER": (lambda run: lambda b: run(b[0]))(jax_stepper(model, bspec, "alter", "drift", threshold=threshold)),
    }
    if with_torch:
        torch.manual_seed(study["seed"])
        sides["transformers+PEFT LoRA-GD"] = (lambda run: lambda b: run(b[1]))(
            torch_lora_gd_stepper(torch_model(spec.folder), lr=study["lr_lora"]))
    names = list(sides)
    first_epoch = {n: 0.0 for n in names}
    for b in batches:  # pass 1: every bucket compiles (first steps, compile included)
        for n in names:
            t0 = time.perf_counter()
            sides[n](b)
            first_epoch[n] += time.perf_counter() - t0
    times = {n: [] for n in names}
    for i, b in enumerate(batches):  # pass 2: timed, interleaved, rotating order
        for n in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            sides[n](b)
            times[n].append(time.perf_counter() - t0)
    real_tokens = {"ours": sum(int(sum(o[s]["attention_mask"].sum() for s in SIDES)) for o, _ in batches),
                   "torch": sum(int(sum(r[s]["attention_mask"].sum() for s in SIDES)) for _, r in batches)}
    padded_tokens = {"ours": sum(sum(o[s]["input_ids"].size for s in SIDES) for o, _ in batches),
                     "torch": sum(sum(int(torch_side(r[s])["input_ids"].numel()) for s in SIDES) for _, r in batches)}
    rows, epoch_s = [], {}
    for n in names:
        epoch_s[n] = float(sum(times[n]))
        key = "torch" if "PEFT" in n else "ours"
        rows.append({"section": "epoch", "name": n, "compile_s": first_epoch[n], "median_s": float(np.median(times[n])),
                     "tokens_per_s": real_tokens[key] / epoch_s[n],
                     "spread": float((max(times[n]) - min(times[n])) / np.median(times[n])), "epoch_s": epoch_s[n],
                     "times_s": times[n]})
    ratios = [_ratio("epoch", "ALTER / ours LoRA-GD epoch time", epoch_s["ours ALTER"] / epoch_s["ours LoRA-GD"], "<= 1.25")]
    extra = {"steps_per_epoch": len(batches), "threshold": threshold, "forget_experts": n_sub,
             "buckets": sorted({(o["forget"]["input_ids"].shape[1], o["forget"]["score_pos"].shape[1]) for o, _ in batches}),
             "real_tokens_epoch": real_tokens["ours"], "padded_tokens_ours": padded_tokens["ours"],
             "padded_tokens_torch": padded_tokens["torch"],
             "alter_over_ours_lora_time": epoch_s["ours ALTER"] / epoch_s["ours LoRA-GD"],
             "tokens_per_s": {n: r["tokens_per_s"] for n, r in zip(names, rows)},
             "first_epoch_s": first_epoch}
    if with_torch:
        v = epoch_s["ours LoRA-GD"] / epoch_s["transformers+PEFT LoRA-GD"]
        ratios.insert(0, _ratio("epoch", "ours LoRA-GD / PyTorch LoRA-GD epoch time", v, "<= 0.7"))
        extra["ours_lora_over_torch_time"] = v
    if first_step:
        with tempfile.TemporaryDirectory() as cache:
            cold = _first_step_subprocess(spec.folder, tofu_dir, length_bucket, Path(cache))
            warm = _first_step_subprocess(spec.folder, tofu_dir, length_bucket, Path(cache))
        extra.update(first_step_s=cold, first_step_warm_s=warm)
        ratios += [_ratio("epoch", "first ALTER step, cold cache (s)", cold, "<= 15"),
                   _ratio("epoch", "first ALTER step, warm cache (s)", warm, "<= 3")]
    return rows, ratios, extra


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--first-step":
    import torch  # noqa: F401  (as bin/bench: torch before jax)

    print(json.dumps(first_alter_step(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
