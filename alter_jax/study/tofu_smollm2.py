"""TOFU study on the real pretrained SmolLM2-135M-Instruct (issue 8, items 4 and 5).

Stages (each writes its result to disk; a rerun skips finished stages)::

    data        a TOFU-layout subset folder: forget = forget01 (2 fictitious authors), retain = the first
                ``retain_rows`` rows of retain_perturbed (= retain90's first authors), eval subsets of
                retain / real authors / world facts
    eval/untouched   the untouched SmolLM2 on the whole TOFU metric set
    models/full      full fine-tuning (every parameter) on forget + retain; models/retain: on retain only
    eval/full, eval/retain
    runs/<method>    ``train.loop.unlearn`` from the full model, the same budget for every method
    eval/<method>    the whole metric set (ALTER / AsymLoRA through the entropy-gated forward)
    speed.json       one LoRA-GD epoch with transformers + PEFT (padded to the batch's longest) vs
                     ours (from the lora_gd / alter runs' step log, compile step excluded)
    report           ``out_dir``/report.json, report.md, fq_vs_mu.png (rewritten after every stage)

Metrics (:mod:`alter_jax.eval.tofu`): Model Utility = hmean of Prob./ROUGE/Truth Ratio on retain,
real authors and world facts; Forget Quality = KS p-value of the forget truth ratios against the
retain model's; forget ROUGE = mean ROUGE-L recall of greedy answers on the forget rows;
paraphrase ROUGE = the same for the ``paraphrased_question`` of each forget row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

METHODS = ("alter", "lora_gd", "graddiff", "npo_gd", "ga", "npo", "asymlora")
LORA_METHODS = ("lora_gd", "alter", "asymlora")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Scale and settings of the study (defaults = the committed run)."""

    model: str = "smollm2-135m-instruct"
    tofu_dir: str = "../shared/data/tofu"
    work_dir: str = "runs/study_smollm2"
    out_dir: str = "studies/tofu_smollm2"
    forget_split: str = "forget01"
    forget_per_author: int = 8  # 0 = all 20 rows of each forget author
    retain_rows: int = 16  # rows of retain_perturbed (first author) in the training retain set
    eval_rows: int = 8  # rows of retain / real authors / world facts evaluated (forget: all)
    max_length: int = 128
    max_new_tokens: int = 32
    eval_batch: int = 8
    ft_epochs: int = 5
    ft_lr: float = 2e-4
    ft_batch: int = 8
    unlearn_epochs: int = 2
    unlearn_batch: int = 4
    lr_full: float = 2e-5  # ga, graddiff, npo, npo_gd
    lr_lora: float = 1e-3  # lora_gd; ALTER / AsymLoRA use lr_b = this, lr_a 1e-5, router 1e-2
    alter_threshold: float = 0.3  # ALTER: entropy quantile; the top 70 % of answer tokens are high-entropy
    methods: tuple[str, ...] = METHODS
    # extra runs, all reported beside the methods: (run name, method, overrides of the fields above);
    # same epochs and batch (same budget), other learning rates / entropy threshold
    variants: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = (
        ("alter_lr3e-3", "alter", (("lr_lora", 3e-3),)),
        ("alter_thr0.6", "alter", (("alter_threshold", 0.6),)),
        ("asymlora_lr3e-3", "asymlora", (("lr_lora", 3e-3),)),
        ("lora_gd_lr3e-4", "lora_gd", (("lr_lora", 3e-4),)),
        ("graddiff_lr1e-4", "graddiff", (("lr_full", 1e-4),)),
        ("npo_gd_lr1e-4", "npo_gd", (("lr_full", 1e-4),)),
    )
    torch_speed: bool = True
    seed: int = 0


QUICK = dict(forget_per_author=2, retain_rows=4, eval_rows=2, max_new_tokens=8, ft_epochs=1, ft_batch=4,
             unlearn_epochs=1, unlearn_batch=2, methods=("alter", "lora_gd"), variants=(), work_dir="runs/study_smollm2_quick",
             out_dir="runs/study_smollm2_quick/out")


def quick_config(**kw) -> StudyConfig:
    """The ``--quick`` scale: 4 forget + 4 retain rows, 2 eval rows, 1 epoch, alter + lora_gd."""
    return StudyConfig(**{**QUICK, **kw})


# ----------------------------------------------------------------------------- helpers
def run_specs(cfg: StudyConfig) -> dict[str, tuple[str, StudyConfig, dict[str, Any]]]:
    """Every unlearning run: ``name -> (method, settings, overrides)``; the methods first, then the variants."""
    from alter_jax.train.methods import METHODS as ALL

    out: dict[str, tuple[str, StudyConfig, dict[str, Any]]] = {m: (m, cfg, {}) for m in cfg.methods}
    fields = {f.name for f in dataclasses.fields(StudyConfig)} - {"variants", "methods"}
    for name, method, overrides in cfg.variants:
        ov = dict(overrides)
        bad = sorted(set(ov) - fields)
        if method not in ALL or bad or name in out:
            raise ValueError(f"study variant {name!r}: method {method!r} (choose from {', '.join(ALL)}), "
                             f"unknown fields {bad} (choose from {', '.join(sorted(fields))}), or a duplicate name")
        out[name] = (method, dataclasses.replace(cfg, **ov), ov)
    return out


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text())


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_data(cfg: StudyConfig, dest: Path) -> dict[str, int]:
    """Write the TOFU-layout subset folder ``dest`` (forget, forget_perturbed, retain, retain_perturbed,
    full, real_authors_perturbed, world_facts_perturbed); returns the row counts."""
    from alter_jax.data.tofu import author_blocks, load_tofu_split

    src = cfg.tofu_dir
    forget = load_tofu_split(f"{cfg.forget_split}_perturbed", src)
    if cfg.forget_per_author:
        forget = [r for block in author_blocks(forget) for r in block[: cfg.forget_per_author]]
    retain = load_tofu_split("retain_perturbed", src)[: cfg.retain_rows]
    n_eval = cfg.eval_rows
    splits = {
        "forget_perturbed": forget,
        "forget": [{"question": r["question"], "answer": r["answer"]} for r in forget],
        "retain": [{"question": r["question"], "answer": r["answer"]} for r in retain],
        "retain_perturbed": retain[:n_eval],
        "real_authors_perturbed": load_tofu_split("real_authors_perturbed", src)[:n_eval],
        "world_facts_perturbed": load_tofu_split("world_facts_perturbed", src)[:n_eval],
    }
    splits["full"] = splits["forget"] + splits["retain"]
    dest.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        _write_json(dest / f"{name}.json", rows)
    return {k: len(v) for k, v in splits.items()}


def evaluate_model(cfg: StudyConfig, logits_fn, generate_fn, tok, data_dir: Path, out: Path,
                   ppl_logits_fn=None, ppl_reference: str | None = None) -> dict[str, Any]:
    """The whole TOFU metric set into ``out`` (legacy logs + summary.json) plus the paraphrased-question
    ROUGE (``paraphrase.json``); returns the summary (no Forget Quality: see :func:`collect`).
    ``ppl_logits_fn``: the model scoring the greedy answers (``generated_ppl``; the study passes
    the untouched SmolLM2)."""
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.eval.tofu import evaluate_tofu, generate_answers, rouge_recall

    t0 = time.perf_counter()
    summary = evaluate_tofu(logits_fn, generate_fn, tok, out, forget_split="forget", source=str(data_dir),
                            ds_size=None, batch_size=cfg.eval_batch, max_length=cfg.max_length,
                            max_new_tokens=cfg.max_new_tokens, progress=False, ppl_logits_fn=ppl_logits_fn,
                            ppl_reference=ppl_reference)
    rows = load_tofu_split("forget_perturbed", str(data_dir))
    _, gens = generate_answers(generate_fn, tok, [r["paraphrased_question"] for r in rows], batch_size=cfg.eval_batch,
                               max_new_tokens=cfg.max_new_tokens)
    _, rl = rouge_recall(gens, [r["answer"] for r in rows])
    _write_json(out / "paraphrase.json", {"rougeL_recall": rl, "generated": gens})
    summary["eval_wall_s"] = time.perf_counter() - t0
    _write_json(out / "summary.json", summary)
    return summary


def _eval_done(out: Path) -> bool:
    return (out / "summary.json").is_file() and (out / "paraphrase.json").is_file()


def finetune_model(cfg: StudyConfig, split: str, data_dir: Path, dest: Path) -> dict:
    """Full-parameter fine-tuning of the base model on ``split`` -> HF folder ``dest`` (+ finetune.json)."""
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.io.hf import load_pretrained, load_tokenizer, save_pretrained
    from alter_jax.train.finetune import finetune
    from alter_jax.train.loop import resolve_run_model
    from alter_jax.train.prepare import encode

    t0 = time.perf_counter()
    folder = resolve_run_model(cfg.model, progress=False)
    model, tok = load_pretrained(folder), load_tokenizer(folder)
    rows = load_tofu_split(split, str(data_dir))
    arrays = encode(tok, rows, "auto", cfg.max_length)
    model, losses = finetune(model, arrays, epochs=cfg.ft_epochs, lr=cfg.ft_lr, batch_size=cfg.ft_batch,
                             weight_decay=0.01, warmup_frac=1.0 / max(cfg.ft_epochs, 2), seed=cfg.seed,
                             progress=False, desc=f"finetune[{split}]")
    tmp = dest.with_name(dest.name + ".partial")
    save_pretrained(model, tmp, tokenizer=tok)
    info = {"split": split, "rows": len(rows), "epochs": cfg.ft_epochs, "lr": cfg.ft_lr, "batch_size": cfg.ft_batch,
            "steps": len(losses), "first_loss": losses[0], "final_loss": float(np.mean(losses[-3:])),
            "real_tokens": int(arrays["attention_mask"].sum()) * cfg.ft_epochs, "wall_s": time.perf_counter() - t0}
    _write_json(tmp / "finetune.json", info)
    tmp.replace(dest)
    return info


def run_config(cfg: StudyConfig, method: str, model_dir: Path, data_dir: Path, out: Path):
    """The ``RunConfig`` of one unlearning run (same data, epochs and batch for every method)."""
    from alter_jax import config as C

    return C.RunConfig(
        model=C.ModelSpec(name=str(model_dir), prompt_format="auto", max_length=cfg.max_length),
        entropy=C.EntropyConfig(threshold="quantile", value=cfg.alter_threshold),
        optim=C.OptimConfig(lr=cfg.lr_lora if method in LORA_METHODS else cfg.lr_full, lr_b=cfg.lr_lora),
        data=C.DataConfig(source=str(data_dir), forget_split="forget", retain_split="retain", num_subdomains=2),
        train=C.TrainConfig(method=method, epochs=cfg.unlearn_epochs, batch_size=cfg.unlearn_batch, seed=cfg.seed,
                            checkpoint_every=1000),
        eval=C.EvalConfig(batch_size=cfg.eval_batch, max_new_tokens=4, num_questions=2),
        output_dir=str(out),
    )


# ----------------------------------------------------------------------------- speed
def our_epoch_speed(run_dir: Path, cfg: StudyConfig) -> dict[str, float]:
    """Steady tokens/s of our trainer from a run's ``metrics.jsonl`` (cumulative real-token rate per
    step), the first (compiling) step excluded; real tokens per step recomputed from the same batches.
    Returns ``{tokens_per_s, epoch_s (one epoch at that rate), real_tokens_epoch, steps_epoch}``."""
    from alter_jax.data.batching import forget_retain_batches
    from alter_jax.train.prepare import encode
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.io.hf import load_tokenizer

    run = _read_json(run_dir / "config.json")["config"]
    tok = load_tokenizer(run["model"]["name"])
    data = run["data"]["source"]
    arrays = {s: encode(tok, load_tofu_split(s, data), "auto", cfg.max_length) for s in ("forget", "retain")}
    per_step = []
    for epoch in range(cfg.unlearn_epochs):
        for b in forget_retain_batches(arrays["forget"], arrays["retain"], cfg.unlearn_batch, seed=cfg.seed, epoch=epoch):
            per_step.append(int(b["forget"]["attention_mask"].sum() + b["retain"]["attention_mask"].sum()))
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("phase") == "main"]
    cum = np.cumsum(per_step[: len(rows)])
    elapsed = cum / np.asarray([r["tokens_per_s"] for r in rows])
    steps_epoch = math.ceil(len(arrays["forget"]["input_ids"]) / cfg.unlearn_batch)
    epoch_tokens = int(sum(per_step[:steps_epoch]))
    if len(rows) < 2:
        rate = float(cum[-1] / elapsed[-1])
    else:
        rate = float((cum[-1] - cum[0]) / (elapsed[-1] - elapsed[0]))
    return {"tokens_per_s": rate, "epoch_s": epoch_tokens / rate, "real_tokens_epoch": epoch_tokens,
            "steps_epoch": steps_epoch, "first_step_s": float(elapsed[0])}


def torch_lora_gd_epoch(cfg: StudyConfig, model_dir: Path, data_dir: Path, threads: int = 2) -> dict[str, float]:
    """One LoRA-GD epoch with transformers + PEFT (r=8, alpha=16, all linear layers), AdamW, each side's
    batch padded to its longest sequence (open-unlearning's collator), loss = −NLL(forget) + NLL(retain);
    the same forget/retain pairing and order as ours. Times every step (first included and reported)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alter_jax.bench.epoch import torch_lora_gd_stepper, torch_side
    from alter_jax.data.batching import forget_retain_batches
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.io.hf import load_tokenizer
    from alter_jax.train.prepare import encode

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_dir)
    arrays = {s: encode(tok, load_tofu_split(s, str(data_dir)), "auto", cfg.max_length) for s in ("forget", "retain")}
    step = torch_lora_gd_stepper(AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32),
                                 lr=cfg.lr_lora)
    times, tokens = [], []
    for b in forget_retain_batches(arrays["forget"], arrays["retain"], cfg.unlearn_batch, seed=cfg.seed, epoch=0):
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
        tokens.append(int(sum(torch_side(b[s])["attention_mask"].sum() for s in ("forget", "retain"))))
    total = float(sum(times))
    steady = (sum(tokens[1:]) / sum(times[1:])) if len(times) > 1 else tokens[0] / times[0]
    return {"epoch_s": total, "tokens_per_s_all_steps": sum(tokens) / total, "tokens_per_s": float(steady),
            "real_tokens_epoch": int(sum(tokens)), "steps_epoch": len(times), "first_step_s": times[0],
            "threads": threads}


def speed_summary(ours_lora: dict | None, ours_alter: dict | None, torch_lora: dict | None) -> dict[str, Any]:
    """Ratios of the issue's goals: ours LoRA-GD epoch time / PyTorch's (goal ≤ 0.7) and ALTER / ours
    LoRA-GD (goal ≤ 1.25), from steady tokens/s (equal real tokens per epoch)."""
    out: dict[str, Any] = {"ours_lora_gd": ours_lora, "ours_alter": ours_alter, "torch_lora_gd": torch_lora}
    if ours_lora and torch_lora:
        out["ours_over_torch_time"] = torch_lora["tokens_per_s"] / ours_lora["tokens_per_s"]
    if ours_lora and ours_alter:
        out["alter_over_lora_time"] = ours_lora["tokens_per_s"] / ours_alter["tokens_per_s"]
    return out


# ----------------------------------------------------------------------------- report
def collect(cfg: StudyConfig, work: Path) -> dict[str, Any]:
    """report.json content from whatever stages have finished (fluency: :mod:`alter_jax.study.fluency`)."""
    from alter_jax.eval.tofu import aggregate
    from alter_jax.study.fluency import folder_fluency

    ev = work / "eval"
    retain_logs = ev / "retain" if _eval_done(ev / "retain") else None
    entries: dict[str, Any] = {}
    specs = run_specs(cfg)
    for name in ("untouched", "full", "retain", *specs):
        d = ev / name
        if not _eval_done(d):
            continue
        agg = aggregate(d, retain_logs)
        para = _read_json(d / "paraphrase.json")
        summ = _read_json(d / "summary.json")
        e = {"forget_quality": agg["forget_quality"], "model_utility": agg["model_utility"],
             "forget_rouge": agg["forget"]["Forget ROUGE"], "forget_prob": agg["forget"]["Forget Prob."],
             "forget_truth_ratio": agg["forget"]["Forget Truth Ratio"],
             "paraphrase_rouge": float(np.mean(para["rougeL_recall"])), "mu_parts": agg["parts"],
             "eval_wall_s": summ.get("eval_wall_s"), **folder_fluency(d)}
        if name in ("full", "retain"):
            e["wall_s"] = _read_json(work / "models" / name / "finetune.json")["wall_s"]
        elif name == "untouched":
            e["wall_s"] = 0.0
        else:
            e["wall_s"] = _read_json(work / "runs" / name / "report.json")["wall_s"]
        if name in specs:
            e["method"], e["overrides"] = specs[name][0], specs[name][2]
        entries[name] = e
    full_mu = entries.get("full", {}).get("model_utility")
    for name, e in entries.items():
        e["mu_over_full"] = e["model_utility"] / full_mu if full_mu else None
    goal = {}
    if "full" in entries and retain_logs is not None:
        def hits(e):
            return (e["forget_quality"] or 0) >= 0.05 and (e["mu_over_full"] or 0) >= 0.9
        goal = {m: hits(entries[m]) for m in specs if m in entries}
    speed = _read_json(work / "speed.json") if (work / "speed.json").is_file() else None
    return {"config": dataclasses.asdict(cfg), "data": _read_json(work / "data" / "counts.json"),
            "untouched": entries.get("untouched"), "full": entries.get("full"), "retain": entries.get("retain"),
            "methods": {m: entries[m] for m in cfg.methods if m in entries},
            "variants": {m: entries[m] for m in specs if m not in cfg.methods and m in entries},
            "missing": [m for m in ("untouched", "full", "retain", *specs) if m not in entries],
            "goal_fq_0.05_and_mu_0.9_full": goal, "speed": speed}


def _fmt(v, p=3):
    if v is None:
        return "—"
    if isinstance(v, float) and (abs(v) < 1e-3 and v != 0):
        return f"{v:.1e}"
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)


def mu_text(mu: float | None, parts: dict[str, float] | None) -> str:
    """Model Utility for a table or log line. A harmonic mean is 0 as soon as one part is 0, which at
    ``--quick`` scale (2 rows, 8 new tokens) says nothing about the model: then the text names the
    part (issue 14) instead of printing a bare 0.000."""
    zero = sorted(k for k, v in (parts or {}).items() if v == 0)
    if mu == 0 and zero:
        return f"n/a ({zero[0]} = 0{' and more' if len(zero) > 1 else ''})"
    return _fmt(mu)


def write_report(cfg: StudyConfig, work: Path, command: str) -> dict[str, Any]:
    """Write report.json, report.md and fq_vs_mu.png into ``cfg.out_dir``."""
    rep = collect(cfg, work)
    rep["command"] = command
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "report.json", rep)
    rows = [("untouched", rep["untouched"]), ("full", rep["full"]), ("retain", rep["retain"]),
            *rep["methods"].items(), *rep["variants"].items()]
    lines = ["# TOFU study on SmolLM2-135M-Instruct", "", f"Command: `{command}`", "",
             _scale_text(cfg, rep["data"]), "",
             "| model | Forget Quality | Model Utility | MU / full | forget degenerate | forget gen. ppl | retain degenerate "
             "| retain gen. ppl | forget ROUGE-L | paraphrase ROUGE-L | forget Prob. | wall s (train) | wall s (eval) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in rows:
        if e is None:
            lines.append(f"| {name} | not finished | | | | | | | | | | | |")
            continue
        flu = " | ".join(_fmt(e.get(k)) for k in ("forget_degenerate", "forget_gen_ppl", "retain_degenerate",
                                                   "retain_gen_ppl"))
        lines.append(f"| {name} | {_fmt(e['forget_quality'])} | {mu_text(e['model_utility'], e.get('mu_parts'))} | "
                     f"{_fmt(e['mu_over_full'])} | "
                     f"{flu} | "
                     f"{_fmt(e['forget_rouge'])} | {_fmt(e['paraphrase_rouge'])} | {_fmt(e['forget_prob'])} | "
                     f"{_fmt(e['wall_s'], 0)} | {_fmt(e['eval_wall_s'], 0)} |")
    lines += ["", "degenerate = share of greedy answers that are empty, letterless, or one whitespace-token / character "
              "run covering more than half of the answer; gen. ppl = mean perplexity of the greedy answer (prompt + "
              "answer scored, answer tokens averaged) under the untouched SmolLM2 (docs/eval_definitions.md, fluency); "
              "— = not measured (evaluated before these columns existed)."]
    if rep["untouched"]:
        lines += ["", "Untouched SmolLM2 (real knowledge unlearning must keep): " + ", ".join(
            f"{k} {v:.3f}" for k, v in rep["untouched"]["mu_parts"].items() if k.startswith(("Real", "Retain")))]
    if cfg.variants:
        lines += ["", "Variants (same epochs and batch as the methods; one setting changed):"]
        lines += [f"- `{n}`: {m} with {dict(o)}" for n, m, o in cfg.variants]
    if rep["missing"]:
        lines += ["", f"Stages not finished: {', '.join(rep['missing'])}"]
    goal = rep["goal_fq_0.05_and_mu_0.9_full"]
    if goal:
        lines += ["", "Goal (FQ ≥ 0.05 and MU ≥ 0.9 × full): " + ", ".join(f"{m}: {'yes' if v else 'no'}"
                                                                            for m, v in goal.items())]
    sp = rep["speed"]
    if sp:
        lines += ["", "## Speed (one unlearning epoch, real tokens only)", "",
                  "| trainer | real tokens/s (steady) | epoch s | first step s |", "|---|---|---|---|"]
        for k, label in (("ours_lora_gd", "ours LoRA-GD (fixed max_length padding)"),
                         ("torch_lora_gd", "transformers + PEFT LoRA-GD (pad to longest)"),
                         ("ours_alter", "ours ALTER")):
            v = sp.get(k)
            if v:
                lines.append(f"| {label} | {v['tokens_per_s']:.1f} | {v['epoch_s']:.1f} | {v['first_step_s']:.1f} |")
        if "ours_over_torch_time" in sp:
            lines.append(f"\nours / PyTorch epoch time: {sp['ours_over_torch_time']:.2f} (goal ≤ 0.7)")
        if "alter_over_lora_time" in sp:
            lines.append(f"\nALTER / our LoRA-GD epoch time: {sp['alter_over_lora_time']:.2f} (goal ≤ 1.25)")
    from alter_jax.study.fluency import examples_markdown

    lines += [""] + examples_markdown({**rep["methods"], **rep["variants"]}, mu_key="mu_over_full")
    lines += ["", "![forget quality vs model utility](fq_vs_mu.png)", ""]
    notes = out / "notes.md"  # hand-written reading of the results, kept across report rewrites
    if notes.is_file():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot(rows, out / "fq_vs_mu.png")
    return rep


def _scale_text(cfg: StudyConfig, counts: dict) -> str:
    return (f"Scale: forget = {cfg.forget_split} ({counts['forget']} rows, 2 fictitious authors), training retain = "
            f"{counts['retain']} rows of retain_perturbed; evaluation on all forget rows and the first "
            f"{cfg.eval_rows} rows of retain_perturbed, real_authors_perturbed, world_facts_perturbed; max_length "
            f"{cfg.max_length}, greedy answers of {cfg.max_new_tokens} new tokens. full / retain models: full "
            f"fine-tuning (every parameter), {cfg.ft_epochs} epochs, lr {cfg.ft_lr}, batch {cfg.ft_batch}. "
            f"Unlearning: {cfg.unlearn_epochs} epochs, batch {cfg.unlearn_batch} forget + {cfg.unlearn_batch} "
            f"retain, lr {cfg.lr_full} (full-parameter methods), {cfg.lr_lora} (LoRA r=8 / ALTER B experts; "
            f"ALTER A 1e-5, router 1e-2, entropy threshold = {cfg.alter_threshold:.0%} quantile, 2 sub-domains). "
            "float32, CPU (2 cores).")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors: dict[str, Any] = {}
    placed: list[tuple[float, float]] = []  # label anchors so far: near-coincident points stack their labels
    full_mu = next((e["model_utility"] for name, e in rows if name == "full" and e is not None), None)
    for name, e in rows:
        if e is None or e["forget_quality"] is None:
            continue
        fq = max(e["forget_quality"], 1e-12)
        near = sum(abs(mu - e["model_utility"]) < 0.02 and abs(np.log10(q / fq)) < 0.15 for mu, q in placed)
        placed.append((e["model_utility"], fq))
        method = e.get("method", name)
        color = colors.setdefault(method, f"C{len(colors) % 10}")
        variant = bool(e.get("overrides"))  # hollow marker: a variant of a method's default setting
        ax.scatter(e["model_utility"], fq, marker="*" if method == "alter" else "o",
                   s=90 if method == "alter" else 40, facecolors="none" if variant else color, edgecolors=color)
        ax.annotate(name, (e["model_utility"], fq), textcoords="offset points", xytext=(4, 4 + 8 * near), fontsize=7)
    ax.set_yscale("log")
    ax.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
    if full_mu is not None:  # the goal's utility bar: 90 % of the full model
        ax.axvline(0.9 * full_mu, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS p-value, log)")
    ax.set_title("TOFU forget01, SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the study
def run_study(cfg: StudyConfig, command: str = "bin/study tofu-smollm2", log: Callable[[str], None] = _log) -> dict:
    """Run (or resume) every stage; returns the report."""
    from alter_jax.io.hf import load_pretrained, load_tokenizer
    from alter_jax.generate import model_fns
    from alter_jax.train.loop import load_run_result, resolve_run_model, unlearn

    work = Path(cfg.work_dir)
    data_dir = work / "data"
    if not (data_dir / "counts.json").is_file():
        counts = build_data(cfg, data_dir)
        _write_json(data_dir / "counts.json", counts)
    from alter_jax.study.fluency import copy_idk_answers

    copy_idk_answers(cfg.tofu_dir, data_dir)  # IdkNLL / IdkDPO (--methods) read it from the subset
    log(f"data {_read_json(data_dir / 'counts.json')}")
    report = lambda: write_report(cfg, work, command)  # noqa: E731

    backbone: list = []  # the untouched SmolLM2's LogitsFn: scores every model's greedy answers (generated_ppl)

    def ppl_fn():
        if not backbone:
            backbone.append(model_fns(load_pretrained(resolve_run_model(cfg.model, progress=False)))[0])
        return backbone[0]

    def eval_stage(name: str, load) -> None:
        out = work / "eval" / name
        if _eval_done(out):
            return
        log(f"eval {name}")
        lf, gf, tok = load()
        s = evaluate_model(cfg, lf, gf, tok, data_dir, out, ppl_logits_fn=ppl_fn(),
                           ppl_reference=f"untouched {cfg.model}")
        log(f"eval {name}: MU {mu_text(s['model_utility'], s.get('parts'))} forget ROUGE {s['forget']['Forget ROUGE']:.3f} "
            f"({s['eval_wall_s']:.0f} s)")
        report()

    def load_folder(folder):
        def f():
            m = load_pretrained(folder)
            lf, gf = model_fns(m)
            return lf, gf, load_tokenizer(folder)
        return f

    eval_stage("untouched", load_folder(resolve_run_model(cfg.model, progress=False)))
    models = work / "models"
    for name, split in (("full", "full"), ("retain", "retain")):
        if not (models / name / "finetune.json").is_file():
            log(f"finetune {name}")
            info = finetune_model(cfg, split, data_dir, models / name)
            log(f"finetune {name}: loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} ({info['wall_s']:.0f} s)")
        eval_stage(name, load_folder(models / name))

    def speed_stage():
        if _speed_stage(cfg, work, models, data_dir, log):
            report()

    for name, (method, run_cfg, _) in run_specs(cfg).items():
        rd = work / "runs" / name
        if not (rd / "report.json").is_file():
            log(f"unlearn {name}")
            r = unlearn(run_config(run_cfg, method, models / "full", data_dir, rd), progress=False,
                        log=lambda *_: None)
            log(f"unlearn {name}: {r['steps']} steps, {r['wall_s']:.0f} s")

        def load_run(rd=rd):
            _, tok, lf, gf = load_run_result(rd)
            return lf, gf, tok
        eval_stage(name, load_run)
        speed_stage()
    speed_stage()
    rep = report()
    log(f"report written to {cfg.out_dir}")
    return rep


def _speed_stage(cfg: StudyConfig, work: Path, models: Path, data_dir: Path, log) -> bool:
    """speed.json once the lora_gd (and alter) runs exist; returns True when written."""
    runs = work / "runs"
    if (work / "speed.json").is_file() or "lora_gd" not in cfg.methods:
        return False
    if not (runs / "lora_gd" / "report.json").is_file():
        return False
    if "alter" in cfg.methods and not (runs / "alter" / "report.json").is_file():
        return False
    ours = our_epoch_speed(runs / "lora_gd", cfg)
    alter = our_epoch_speed(runs / "alter", cfg) if "alter" in cfg.methods else None
    torch_res = None
    if cfg.torch_speed:
        log("speed: transformers + PEFT LoRA-GD epoch")
        torch_res = torch_lora_gd_epoch(cfg, models / "full", data_dir)
    _write_json(work / "speed.json", speed_summary(ours, alter, torch_res))
    return True


# ----------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The ``tofu-smollm2`` options (shared by ``bin/study tofu-smollm2`` and ``python -m``)."""
    p.add_argument("--quick", action="store_true", help="tiny scale (4+4 rows, 1 epoch, alter + lora_gd; tests)")
    p.add_argument("--work-dir", default=None, help="stage outputs (default: runs/study_smollm2[_quick])")
    p.add_argument("--out", default=None, help="report folder (default: studies/tofu_smollm2)")
    p.add_argument("--tofu-dir", default=StudyConfig.tofu_dir, help="TOFU folder (default: %(default)s)")
    p.add_argument("--methods", default=None, help=f"comma list (default: {','.join(METHODS)})")
    p.add_argument("--no-torch-speed", action="store_true", help="skip the transformers + PEFT speed epoch")
    p.add_argument("--no-variants", action="store_true", help="only the methods at their default settings")


def config_from_args(args) -> StudyConfig:
    kw: dict[str, Any] = {"tofu_dir": args.tofu_dir, "torch_speed": not args.no_torch_speed}
    if args.no_variants:
        kw["variants"] = ()
    if args.work_dir:
        kw["work_dir"] = args.work_dir
    if args.out:
        kw["out_dir"] = args.out
    if args.methods:
        from alter_jax.train.methods import METHODS as KNOWN

        ms = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in ms if m not in KNOWN]
        if bad:
            raise SystemExit(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(KNOWN)}")
        kw["methods"] = ms
    if not Path(args.tofu_dir).is_dir():
        raise SystemExit(f"--tofu-dir {args.tofu_dir}: not a folder; pass the TOFU data folder (../shared/data/tofu)")
    return quick_config(**kw) if args.quick else StudyConfig(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="study tofu-smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(p.parse_args(argv))
    run_study(cfg, command=" ".join(["bin/study", "tofu-smollm2", *argv]))
    return 0


if __name__ == "__main__":
    import torch  # noqa: F401  (torch before jax, as bin/study: jax first can stall PyTorch's OpenMP workers)

    raise SystemExit(main())
