"""TOFU at small scale: a tiny Llama trained from scratch on real TOFU authors (issue 5, item 5).

Stages (each writes its result under ``work_dir``; a rerun skips finished stages)::

    data/            a TOFU-layout folder: ``full`` (the subset), ``forget`` / ``retain`` (training
                     splits read by :func:`alter_jax.train.loop.unlearn`), ``forget_perturbed`` (every
                     forget row) and ``retain_eval_perturbed`` (the retained-author evaluation rows)
    tokenizer/       a BPE tokenizer trained on every TOFU text of the subset
    models/full      a tiny Llama fine-tuned from scratch on every author of the subset
    models/retain    the same model, same budget, on the retained authors only
    runs/<method>    ``unlearn(RunConfig(...))`` from the full model, one budget for every method
    eval/<name>      the metric set below for full, retain and every unlearned model
    ``out_dir``      report.json, report.md, fq_vs_mu.png (rewritten after the last stage)

Subset: TOFU's ``full.json`` is 200 authors x 20 rows (retain90 = authors 0..179, forget10 =
authors 180..199). Perturbed / paraphrased answers exist only for the authors covered by
``retain_perturbed.json`` (the first 20 authors) and ``forget10_perturbed.json`` (the last 20).
The study takes the **last ``authors`` of those 40 authors, in full.json order**, so with
``authors=40`` it is authors 0..19 + 180..199, and every author has paraphrased and perturbed
answers; the last ``forget_authors`` of them (real TOFU forget authors) are forgotten.

Metrics (:mod:`alter_jax.eval.tofu`, TOFU formulas):

- forget: Prob. = mean exp(-avg answer NLL), ROUGE-L recall of greedy answers, Truth Ratio;
  paraphrase ROUGE = ROUGE-L recall (against ``answer``) of the greedy answer to
  ``paraphrased_question``.
- Model Utility = harmonic mean of Prob., ROUGE and Truth Ratio on the retained authors'
  evaluation rows (TOFU's "Retain" part). Real Authors / World Facts are left out: a model
  trained from scratch on 40 fictitious authors knows no real-world facts, so those parts
  would only measure noise and a harmonic mean with a near-zero part is zero.
- Forget Quality = KS-test p-value of the forget truth ratios against the retain model's.
- ALTER / AsymLoRA are evaluated through the entropy-gated forward (``load_run_result`` ->
  ``train.loop.model_eval_fns``), every other model with ``generate.model_fns``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

METHODS = ("alter", "asymlora", "lora_gd", "ga", "graddiff", "npo", "npo_gd")
FULL_PARAM = ("ga", "graddiff", "npo", "npo_gd")
PER_AUTHOR = 20
FMT = "llama2"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Scale and settings of the study (defaults = the committed run)."""

    tofu_dir: str = "../shared/data/tofu"
    work_dir: str = "runs/study_tofu_small"
    out_dir: str = "studies/tofu_small"
    authors: int = 40
    forget_authors: int = 4
    # tokenizer + tiny Llama
    vocab_size: int = 2048
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    max_length: int = 128
    ft_epochs: int = 25
    ft_lr: float = 2e-3
    ft_batch: int = 16
    # unlearning: one budget for every method
    unlearn_epochs: int = 5
    unlearn_batch: int = 4
    lr_full: float = 1e-4  # ga, graddiff, npo, npo_gd
    lr_lora: float = 1e-3  # lora_gd
    alter_lr_a: float = 1e-5
    alter_lr_b: float = 1e-3  # ALTER / AsymLoRA experts
    alter_lr_router: float = 1e-2
    alter_threshold: float = 0.3  # quantile: top 30 % answer tokens are high-entropy
    alter_q: float = 1.0
    retain_bias: float = 2.0
    rank: int = 8
    alpha: float = 16.0
    # extra runs, all reported: (run name, method, overrides of the fields above), e.g. other ALTER
    # settings or the baselines at another learning rate (same epochs / batch: same budget)
    variants: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = (
        ("alter_bias0", "alter", (("retain_bias", 0.0),)),
        ("alter_thr0.5", "alter", (("alter_threshold", 0.5),)),
        ("asymlora_bias0", "asymlora", (("retain_bias", 0.0),)),
        ("lora_gd_lr1e-4", "lora_gd", (("lr_lora", 1e-4),)),
        ("ga_lr1e-5", "ga", (("lr_full", 1e-5),)),
        ("graddiff_lr1e-5", "graddiff", (("lr_full", 1e-5),)),
        ("npo_lr1e-5", "npo", (("lr_full", 1e-5),)),
        ("npo_gd_lr1e-5", "npo_gd", (("lr_full", 1e-5),)),
        ("lora_gd_lr3e-4", "lora_gd", (("lr_lora", 3e-4),)),
        ("ga_lr3e-5", "ga", (("lr_full", 3e-5),)),
        ("graddiff_lr3e-5", "graddiff", (("lr_full", 3e-5),)),
        ("npo_lr3e-5", "npo", (("lr_full", 3e-5),)),
        ("npo_gd_lr3e-5", "npo_gd", (("lr_full", 3e-5),)),
    )
    # evaluation
    retain_eval_per_author: int = 2  # rows of each retained author scored for Model Utility
    forget_eval_rows: int = 0  # 0 = every forget row
    max_new_tokens: int = 64
    eval_batch: int = 16
    methods: tuple[str, ...] = METHODS
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.forget_authors < self.authors:
            raise ValueError(f"--forget-authors must be in 1..{self.authors - 1} (authors - 1), got {self.forget_authors}")
        if self.unlearn_batch < 1 or self.ft_epochs < 1 or self.unlearn_epochs < 1:
            raise ValueError("ft_epochs, unlearn_epochs and unlearn_batch must be >= 1")


def quick_config(**kw) -> StudyConfig:
    """A minutes-scale configuration for tests (few authors, 1 epoch, tiny eval)."""
    base = dict(authors=3, forget_authors=1, vocab_size=512, hidden=64, layers=1, max_length=96, ft_epochs=1,
                ft_batch=8, unlearn_epochs=1, unlearn_batch=4, retain_eval_per_author=2, forget_eval_rows=6,
                max_new_tokens=8, eval_batch=8, variants=())
    base.update(kw)
    return StudyConfig(**base)


# ----------------------------------------------------------------------------- small helpers
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_specs(cfg: StudyConfig) -> dict[str, tuple[str, StudyConfig, dict[str, Any]]]:
    """Every unlearning run: ``name -> (method, settings, overrides)``; the methods first, then the variants."""
    from alter_jax.train.methods import METHODS as ALL

    out: dict[str, tuple[str, StudyConfig, dict[str, Any]]] = {m: (m, cfg, {}) for m in cfg.methods}
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    for name, method, overrides in cfg.variants:
        ov = dict(overrides)
        bad = sorted(set(ov) - fields)
        if method not in ALL or bad or name in out:
            raise ValueError(f"study variant {name!r}: method {method!r} (choose from {', '.join(ALL)}), "
                             f"unknown fields {bad}, or a duplicate name")
        out[name] = (method, dataclasses.replace(cfg, **ov), ov)
    return out


def variant_names(cfg: StudyConfig) -> list[str]:
    return list(run_specs(cfg))


# ----------------------------------------------------------------------------- stage: data
def select_authors(tofu_dir: str | Path, authors: int) -> list[int]:
    """Indices (in full.json, 0..199) of the last ``authors`` authors that have perturbed data.

    Authors with perturbed / paraphrased answers: those whose 20 rows all appear in
    ``retain_perturbed`` plus the 20 of ``forget10_perturbed``.
    """
    from alter_jax.data.tofu import load_tofu_split

    full = load_tofu_split("full", tofu_dir)
    perturbed = {r["question"] for name in ("retain_perturbed", "forget10_perturbed")
                 for r in load_tofu_split(name, tofu_dir)}
    pool = [a for a in range(len(full) // PER_AUTHOR)
            if all(r["question"] in perturbed for r in full[a * PER_AUTHOR:(a + 1) * PER_AUTHOR])]
    if authors > len(pool):
        raise ValueError(f"--authors {authors}: only {len(pool)} TOFU authors in {tofu_dir} have perturbed data "
                         f"(retain_perturbed + forget10_perturbed); pass --authors <= {len(pool)}")
    return pool[-authors:]


def build_data(cfg: StudyConfig, dest: Path) -> dict[str, Any]:
    """Write the study's TOFU-layout folder; returns (and writes ``info.json``) its sizes."""
    from alter_jax.data.tofu import load_tofu_split

    if not 1 <= cfg.forget_authors < cfg.authors:
        raise ValueError(f"--forget-authors must be in 1..{cfg.authors - 1} (authors - 1), got {cfg.forget_authors}")
    src = cfg.tofu_dir
    full = load_tofu_split("full", src)
    by_q = {r["question"]: r for name in ("retain_perturbed", "forget10_perturbed") for r in load_tofu_split(name, src)}
    chosen = select_authors(src, cfg.authors)
    blocks = [full[a * PER_AUTHOR:(a + 1) * PER_AUTHOR] for a in chosen]
    retain_blocks, forget_blocks = blocks[:-cfg.forget_authors], blocks[-cfg.forget_authors:]
    plain = lambda rs: [{"question": r["question"], "answer": r["answer"]} for r in rs]  # noqa: E731
    forget = [r for b in forget_blocks for r in b]
    retain = [r for b in retain_blocks for r in b]
    forget_p = [by_q[r["question"]] for r in forget]
    if cfg.forget_eval_rows:
        forget_p = forget_p[: cfg.forget_eval_rows]
    retain_eval = [by_q[r["question"]] for b in retain_blocks for r in b[: cfg.retain_eval_per_author]]
    _write_jsonl(dest / "full.json", plain(retain + forget))
    _write_jsonl(dest / "forget.json", plain(forget))
    _write_jsonl(dest / "retain.json", plain(retain))
    _write_jsonl(dest / "forget_perturbed.json", forget_p)
    _write_jsonl(dest / "retain_eval_perturbed.json", retain_eval)
    info = {"authors": [int(a) for a in chosen], "forget_authors": [int(a) for a in chosen[-cfg.forget_authors:]],
            "rows": {"full": len(retain) + len(forget), "forget": len(forget), "retain": len(retain),
                     "forget_eval": len(forget_p), "retain_eval": len(retain_eval)}}
    _write_json(dest / "info.json", info)
    return info


# ----------------------------------------------------------------------------- stage: tokenizer, models
def build_tokenizer(cfg: StudyConfig, data_dir: Path, dest: Path):
    from alter_jax.data.synthetic import train_toy_tokenizer
    from alter_jax.data.tofu import load_tofu_split

    texts = [r["question"] + " " + r["answer"] for r in load_tofu_split("full", data_dir)]
    for name in ("forget_perturbed", "retain_eval_perturbed"):
        for r in load_tofu_split(name, data_dir):
            texts += [r["paraphrased_answer"], r["paraphrased_question"], *r["perturbed_answer"]]
    tok = train_toy_tokenizer(texts, "llama2", cfg.vocab_size)
    tok.save_pretrained(str(dest))
    return tok


def finetune_model(cfg: StudyConfig, tok, data_dir: Path, split: str, dest: Path) -> dict[str, Any]:
    """A tiny Llama trained from scratch on ``split`` (``full`` or ``retain``), saved as a HF folder."""
    from flax import nnx

    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.io.hf import save_pretrained
    from alter_jax.models.config import ModelConfig
    from alter_jax.models.llama import Transformer
    from alter_jax.train.finetune import finetune
    from alter_jax.train.prepare import encode

    rows = load_tofu_split(split, data_dir)
    mcfg = ModelConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                       num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
                       head_dim=cfg.hidden // cfg.heads, bos_token_id=tok.bos_token_id,
                       eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    model = Transformer(mcfg, rngs=nnx.Rngs(cfg.seed))
    t0 = time.perf_counter()
    model, losses = finetune(model, encode(tok, rows, FMT, cfg.max_length), epochs=cfg.ft_epochs, lr=cfg.ft_lr,
                             batch_size=cfg.ft_batch, seed=cfg.seed, progress=False, desc=f"finetune[{split}]")
    wall = time.perf_counter() - t0
    save_pretrained(model, dest, tokenizer=tok)
    info = {"split": split, "rows": len(rows), "params": int(mcfg.num_params()), "epochs": cfg.ft_epochs,
            "lr": cfg.ft_lr, "batch_size": cfg.ft_batch, "final_loss": float(np.mean(losses[-5:])), "wall_s": wall}
    _write_json(dest / "finetune.json", info)
    return info


# ----------------------------------------------------------------------------- stage: unlearning
def _alter_settings(cfg: StudyConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("alter_lr_a", "alter_lr_b", "alter_lr_router", "alter_threshold", "alter_q",
                                         "retain_bias", "unlearn_epochs")}


def run_config(cfg: StudyConfig, name: str, model_dir: Path, data_dir: Path, out: Path):
    """The ``RunConfig`` of one unlearning run (``name`` from :func:`run_specs`)."""
    from alter_jax import config as C
    from alter_jax.adapters.lora import AdapterConfig

    method, cfg, _ = run_specs(cfg)[name]
    a = _alter_settings(cfg)
    lr = cfg.lr_full if method in FULL_PARAM else cfg.lr_lora
    return C.RunConfig(
        model=C.ModelSpec(name=str(model_dir.resolve()), prompt_format=FMT, max_length=cfg.max_length),
        adapter=AdapterConfig(rank=cfg.rank, alpha=cfg.alpha, retain_bias=float(a["retain_bias"])),
        entropy=C.EntropyConfig(q=float(a["alter_q"]), threshold="quantile", value=float(a["alter_threshold"])),
        optim=C.OptimConfig(lr=lr, lr_a=float(a["alter_lr_a"]), lr_b=float(a["alter_lr_b"]),
                            lr_router=float(a["alter_lr_router"])),
        # the study's small BPE tokenizer makes long answers: at max_length 96 (--quick) 60 % of the forget
        # rows are cut (issue 14 made that visible); the study keeps its settings, the loop logs the count
        data=C.DataConfig(source=str(data_dir.resolve()), forget_split="forget", retain_split="retain",
                          allow_truncation=True),
        train=C.TrainConfig(method=method, epochs=int(a["unlearn_epochs"]) if method == "alter" else cfg.unlearn_epochs,
                            batch_size=cfg.unlearn_batch, seed=cfg.seed, checkpoint_every=1000),
        eval=C.EvalConfig(batch_size=8, max_new_tokens=8, num_questions=8),
        output_dir=str(out.resolve()),
    )


# ----------------------------------------------------------------------------- stage: evaluation
def evaluate_model(cfg: StudyConfig, logits_fn, generate_fn, tok, data_dir: Path, out: Path,
                   ppl_logits_fn=None) -> dict[str, Any]:
    """Forget / retained-author TOFU logs + paraphrased-question ROUGE; writes ``out``/summary.json.
    ``ppl_logits_fn``: the backbone that scores the greedy answers (``generated_ppl``; the study
    passes the full model, the one every run starts from)."""
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.eval.tofu import evaluate_split, generate_answers, rouge_recall, task_scores

    kw = dict(logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tok, fmt=FMT, max_length=cfg.max_length,
              batch_size=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens, ppl_logits_fn=ppl_logits_fn)
    forget = load_tofu_split("forget_perturbed", data_dir)
    retain = load_tofu_split("retain_eval_perturbed", data_dir)
    t0 = time.perf_counter()
    logs = {"eval_log_forget.json": evaluate_split(forget, "eval_log_forget", **kw),
            "eval_log.json": evaluate_split(retain, "eval_log", **kw)}
    _, gens = generate_answers(generate_fn, tok, [r["paraphrased_question"] for r in forget], FMT,
                               batch_size=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens)
    para = rouge_recall(gens, [r["answer"] for r in forget])[1]
    for fname, log in logs.items():
        _write_json(out / fname, log)
    retain_scores = task_scores(logs["eval_log.json"], "eval_log.json")
    forget_scores = task_scores(logs["eval_log_forget.json"], "eval_log_forget.json")
    from scipy.stats import hmean

    summary = {
        "model_utility": float(hmean([max(v, 1e-12) for v in retain_scores.values()])),
        "utility_parts": {f"Retain {k}": v for k, v in retain_scores.items()},
        "forget": {f"Forget {k}": v for k, v in forget_scores.items()},
        "forget_prob": forget_scores["Prob."], "forget_rouge": forget_scores["ROUGE"],
        "paraphrase_rouge": float(np.mean(para)),
        "paraphrase_examples": [[r["paraphrased_question"], g, r["answer"]] for r, g in list(zip(forget, gens))[:3]],
        "eval_s": time.perf_counter() - t0, "n_forget": len(forget), "n_retain": len(retain),
    }
    _write_json(out / "summary.json", summary)
    return summary


def _eval_done(out: Path) -> bool:
    return (out / "summary.json").is_file()


def model_fns_for(name: str, work: Path):
    """``(tokenizer, logits_fn, generate_fn)``: plain forward for full / retain / full-parameter
    runs, the run's own evaluation path (gated for ALTER / AsymLoRA) for adapter runs."""
    if name in ("full", "retain"):
        from alter_jax.generate import model_fns
        from alter_jax.io.hf import load_pretrained, load_tokenizer

        folder = work / "models" / name
        lf, gf = model_fns(load_pretrained(folder))
        return load_tokenizer(folder), lf, gf
    from alter_jax.train.loop import load_run_result

    _, tok, lf, gf = load_run_result(work / "runs" / name)
    return tok, lf, gf


# ----------------------------------------------------------------------------- report
def collect(cfg: StudyConfig, work: Path) -> dict[str, Any]:
    """Rows of the report (full, retain, each run) with Forget Quality against the retain model, and
    the fluency of the greedy answers (:mod:`alter_jax.study.fluency`)."""
    from alter_jax.eval.tofu import forget_quality
    from alter_jax.study.fluency import folder_fluency

    retain_logs = {"eval_log_forget.json": _read_json(work / "eval" / "retain" / "eval_log_forget.json")}
    rows: dict[str, Any] = {}
    specs = run_specs(cfg)
    for name in ["full", "retain", *specs]:
        ev = work / "eval" / name
        if not _eval_done(ev):
            continue
        s = _read_json(ev / "summary.json")
        fq, ks = forget_quality({"eval_log_forget.json": _read_json(ev / "eval_log_forget.json")}, retain_logs)
        row = {"forget_quality": fq, "ks_statistic": ks, "model_utility": s["model_utility"],
               "utility_parts": s["utility_parts"], "forget_rouge": s["forget_rouge"],
               "paraphrase_rouge": s["paraphrase_rouge"], "forget_prob": s["forget_prob"],
               "forget_truth_ratio": s["forget"]["Forget Truth Ratio"], "eval_s": s["eval_s"],
               **folder_fluency(ev)}
        if name in ("full", "retain"):
            ft = _read_json(work / "models" / name / "finetune.json")
            row["wall_s"] = ft["wall_s"]
            row["kind"] = "reference"
        else:
            rep = _read_json(work / "runs" / name / "report.json")
            row["wall_s"] = rep["wall_s"]
            row["steps"] = rep["steps"]
            row["kind"] = "unlearned"
            row["method"], row["overrides"] = specs[name][0], specs[name][2]
            row["learning_rates"] = rep["learning_rates"]
            row["trainable_params"] = int(sum(rep["trainable_params"].values()))
            if row["method"] in ("alter", "asymlora"):
                row["alter_settings"] = _alter_settings(specs[name][1])
        rows[name] = row
    full_mu = rows.get("full", {}).get("model_utility")
    learned = full_learned(rows)
    for r in rows.values():
        r["mu_vs_full"] = r["model_utility"] / full_mu if full_mu and learned is not False else None
    return rows


LEARNED_PROB = 0.5  # below this retain prob the full model has not learned its data (e.g. --quick's 1 epoch)


def full_learned(rows: dict[str, Any]) -> bool | None:
    """Whether the full model learned its training data (retain Prob. >= LEARNED_PROB); None without it.
    When it has not, Model Utility (a harmonic mean with near-zero parts) and Forget Quality measure
    nothing and the report says so instead of printing MU 0.000 (issue 14)."""
    if "full" not in rows:
        return None
    return rows["full"]["utility_parts"]["Retain Prob."] >= LEARNED_PROB


def goal_check(rows: dict[str, Any], fq_min: float = 0.05, mu_frac: float = 0.9) -> dict[str, Any]:
    """Does ALTER reach FQ >= fq_min with MU >= mu_frac x full, and does any baseline reach both?"""
    def meets(r):
        return r["forget_quality"] >= fq_min and (r["mu_vs_full"] or 0.0) >= mu_frac

    alters = {k: r for k, r in rows.items() if r.get("method") == "alter"}
    baselines = {k: r for k, r in rows.items() if r.get("kind") == "unlearned" and r.get("method") != "alter"}
    out = {"fq_min": fq_min, "mu_frac": mu_frac,
           "alter_meets": {k: meets(r) for k, r in alters.items()},
           "baselines_meeting": sorted(k for k, r in baselines.items() if meets(r))}
    if "alter" in rows:
        r = rows["alter"]
        out["alter_fq_gap"] = max(0.0, fq_min - r["forget_quality"])
        out["alter_mu_gap"] = max(0.0, mu_frac - (r["mu_vs_full"] or 0.0))
    out["met"] = bool(out["alter_meets"].get("alter")) and not out["baselines_meeting"]
    return out


def _fmt(v, p=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.{p}f}"


def write_report(cfg: StudyConfig, work: Path, command: str) -> dict[str, Any]:
    rows = collect(cfg, work)
    info = _read_json(work / "data" / "info.json")
    ft = {n: _read_json(work / "models" / n / "finetune.json") for n in ("full", "retain")
          if (work / "models" / n / "finetune.json").is_file()}
    goal = goal_check(rows) if "full" in rows else {}
    stage_s = sum(r["wall_s"] + r["eval_s"] for r in rows.values())
    learned = full_learned(rows)
    if learned is False:
        goal = {"not_measurable": not_learned_note(rows)}
    report = {"command": command, "config": dataclasses.asdict(cfg), "data": info, "finetune": ft,
              "methods": rows, "goal": goal, "stages_total_s": stage_s, "full_learned": learned,
              "note": "wall_s of an unlearning run = the whole unlearn() call (model load, entropy pre-pass, "
                      "8-question before/after check, training, export) on 2 CPU cores shared with other jobs: "
                      "timings are noisy."}
    out = Path(cfg.out_dir)
    _write_json(out / "report.json", report)
    if rows:
        _plot(rows, out / "fq_vs_mu.png", None if learned is not False else not_learned_note(rows))
    (out / "report.md").write_text(_markdown(cfg, report, command))
    return report


def not_learned_note(rows: dict[str, Any]) -> str:
    p = rows["full"]["utility_parts"]["Retain Prob."]
    return (f"the full model has not learned its training data (retain prob {p:.3f} < {LEARNED_PROB}; e.g. --quick's "
            "1 epoch), so Model Utility and Forget Quality measure nothing here and are not reported: this run checks "
            "the pipeline only")


def _ranges(xs: Sequence[int]) -> str:
    """[0, 1, 2, 5, 6] -> "0..2, 5..6"."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}..{x}" if x != start else f"{x}")
            start = None
    return ", ".join(out)


def _markdown(cfg: StudyConfig, report: dict, command: str) -> str:
    rows, info, goal = report["methods"], report["data"], report["goal"]
    n_params = next(iter(report["finetune"].values()), {}).get("params", 0)
    lines = [
        "# TOFU at small scale: a tiny Llama trained from scratch on real TOFU authors",
        "",
        f"Command: `{command}`",
        "",
        "## Scale",
        "",
        f"- Authors: {cfg.authors} TOFU authors with perturbed data (full.json author indices "
        f"{_ranges(info['authors'])}, see `alter_jax/study/tofu_small.py`), the last "
        f"{cfg.forget_authors} forgotten (authors {info['forget_authors']}): {info['rows']['forget']} forget rows, "
        f"{info['rows']['retain']} retain rows. Perturbed / paraphrased answers: `retain_perturbed.json` covers "
        "TOFU authors 0..19 and `forget10_perturbed.json` authors 180..199, so the subset is drawn from those 40; "
        "the Model Utility rows of the retained authors come from whichever of the two files holds them.",
        f"- Model: Llama, hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads ({cfg.kv_heads} KV), BPE vocabulary "
        f"{cfg.vocab_size} trained on the subset's TOFU text; {n_params / 1e6:.2f}M parameters; max length {cfg.max_length}.",
        f"- Full / retain model: trained from scratch, {cfg.ft_epochs} epochs, lr {cfg.ft_lr}, batch {cfg.ft_batch} "
        "(same budget for both).",
        f"- Unlearning (every method): {cfg.unlearn_epochs} epochs over the forget set, batch {cfg.unlearn_batch} forget + "
        f"{cfg.unlearn_batch} retain, seed {cfg.seed}. Full-parameter methods (ga, graddiff, npo, npo_gd): lr {cfg.lr_full}; "
        f"LoRA-GD: lr {cfg.lr_lora} (rank {cfg.rank}, alpha {cfg.alpha}); ALTER / AsymLoRA: lr_B {cfg.alter_lr_b}, "
        f"lr_A {cfg.alter_lr_a}, lr_router {cfg.alter_lr_router}, quantile threshold {cfg.alter_threshold}, q {cfg.alter_q}, "
        f"retain_bias {cfg.retain_bias}.",
        f"- Evaluation: all {info['rows']['forget_eval']} forget rows; Model Utility on {info['rows']['retain_eval']} rows "
        f"({cfg.retain_eval_per_author} per retained author); greedy answers of at most {cfg.max_new_tokens} new tokens.",
        "",
        "## Results",
        "",
        "| model | Forget Quality | Model Utility (vs full) | forget degenerate | forget gen. ppl | retain degenerate "
        "| retain gen. ppl | Retain Prob. | Retain ROUGE | Retain TR | forget ROUGE | paraphrase ROUGE | forget Prob. "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    measurable = report.get("full_learned") is not False
    if not measurable:
        lines[-2:-2] = [f"**Not measurable: {not_learned_note(rows)}.**", ""]
    for name, r in rows.items():
        p = r["utility_parts"]
        fq_mu = (f"{_fmt(r['forget_quality'])} | {_fmt(r['model_utility'])} ({_fmt(r['mu_vs_full'], 2)})" if measurable
                 else "n/a | n/a")
        flu = " | ".join(_fmt(r.get(k)) for k in ("forget_degenerate", "forget_gen_ppl", "retain_degenerate",
                                                   "retain_gen_ppl"))
        lines.append(f"| {name} | {fq_mu} | {flu} "
                     f"| {_fmt(p['Retain Prob.'])} | {_fmt(p['Retain ROUGE'])} | {_fmt(p['Retain Truth Ratio'])} "
                     f"| {_fmt(r['forget_rouge'])} | {_fmt(r['paraphrase_rouge'])} | {_fmt(r['forget_prob'])} "
                     f"| {r['wall_s']:.0f} |")
    lines += [
        "",
        "wall s: full / retain = fine-tuning time; unlearned = the whole `unlearn()` call (load, entropy pre-pass, an "
        "8-question before/after check, training, export). 2 CPU cores shared with other engineers' jobs: timings are noisy. "
        f"Sum over all stages (training + evaluation, every row): {report['stages_total_s'] / 60:.1f} min.",
        "",
        "## Definitions",
        "",
        "- Model Utility = harmonic mean of the three TOFU **Retain** parts (Prob., ROUGE-L recall, Truth Ratio "
        "max(0, 1 − 1/r)) on the retained authors' rows. TOFU's Real Authors and World Facts parts are **not used**: "
        "a model trained from scratch on fictitious authors has no real-world knowledge, so they would be noise.",
        "- Forget Quality = KS-test p-value of the forget truth ratios against the retain model's (retain row: 1 by definition).",
        "- forget ROUGE / paraphrase ROUGE = ROUGE-L recall of greedy answers to `question` / `paraphrased_question` "
        "against `answer`; forget Prob. = mean exp(−mean answer-token NLL).",
        "- ALTER and AsymLoRA are evaluated through the entropy-gated forward (Eq. 9, `train.loop.model_eval_fns`).",
        "- degenerate = share of greedy answers that are empty, letterless, or one whitespace-token / character run "
        "covering more than half of the answer; gen. ppl = mean perplexity of the greedy answer (prompt + answer "
        "scored, answer tokens averaged) under the full model, the backbone every run starts from "
        "(docs/eval_definitions.md, fluency). `–`: measured before these columns existed.",
        "",
    ]
    if goal and "not_measurable" in goal:
        lines += ["## Goal", "", f"Not checked: {goal['not_measurable']}.", ""]
    elif goal:
        alter = rows.get("alter")
        lines += ["## Goal: ALTER FQ ≥ 0.05 with MU ≥ 90 % of the full model, no baseline reaching both", ""]
        if alter:
            lines.append(f"- ALTER: FQ {_fmt(alter['forget_quality'])}, MU {_fmt(alter['mu_vs_full'], 3)} × full -> "
                         f"{'met' if goal['alter_meets'].get('alter') else 'not met'}"
                         + ("" if goal['alter_meets'].get('alter') else
                            f" (FQ short by {_fmt(goal['alter_fq_gap'])}, MU short by {_fmt(goal['alter_mu_gap'], 3)} × full)")
                         + ".")
        for k, ok in goal["alter_meets"].items():
            if k != "alter":
                lines.append(f"- {k} ({rows[k]['overrides']}): FQ {_fmt(rows[k]['forget_quality'])}, MU "
                             f"{_fmt(rows[k]['mu_vs_full'], 3)} × full -> {'meets' if ok else 'does not meet'} both.")
        lines.append(f"- Baselines (every other run, AsymLoRA = ALTER without the entropy gate included) meeting both: "
                     f"{', '.join(goal['baselines_meeting']) or 'none'}.")
        for k in goal["baselines_meeting"]:
            lines.append(f"  - {k}: FQ {_fmt(rows[k]['forget_quality'])}, MU {_fmt(rows[k]['mu_vs_full'], 3)} × full.")
        best = max((k for k, r in rows.items() if r.get("kind") == "unlearned" and r.get("method") != "alter"),
                   key=lambda k: rows[k]["forget_quality"], default=None)
        if best:
            lines.append(f"- Highest baseline FQ: {best} ({_fmt(rows[best]['forget_quality'])}, MU "
                         f"{_fmt(rows[best]['mu_vs_full'], 3)} × full).")
        lines.append(f"- Overall: {'met' if goal['met'] else 'not met'}"
                     + ("" if goal["met"] else
                        f" ({'ALTER misses the targets' if not goal['alter_meets'].get('alter') else ''}"
                        f"{'; ' if not goal['alter_meets'].get('alter') and goal['baselines_meeting'] else ''}"
                        f"{'baselines also meeting both: ' + ', '.join(goal['baselines_meeting']) if goal['baselines_meeting'] else ''})")
                     + ".")
        lines += ["", "Caveats: one seed; Forget Quality is a KS p-value over "
                  f"{info['rows']['forget_eval']} forget questions, so it moves in coarse steps; timings are noisy (shared CPU).",
                  ""]
        lines.append("")
    if cfg.variants:
        lines += ["## Settings tried besides the defaults (same epochs and batch size: same budget)", ""]
        lines += [f"- `{n}`: {m} with {dict(o)}" for n, m, o in cfg.variants]
        lines.append("")
    from alter_jax.study.fluency import examples_markdown

    lines += examples_markdown(rows)
    lines += ["![Forget Quality vs Model Utility](fq_vs_mu.png)", ""]
    return "\n".join(lines)


def _plot(rows: dict[str, Any], path: Path, not_measurable: str | None = None) -> None:
    """FQ (log) vs MU like the paper's Figure 4: filled = default settings, hollow = variants (labelled
    only for ALTER / AsymLoRA, to keep the cluster of untouched-looking baselines readable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alter_jax.study.plotting import place_labels

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)  # place_labels measures in the saved pixels
    labels = []
    order = sorted(rows, key=lambda k: (rows[k].get("kind") == "reference", not rows[k].get("overrides")))
    for name in order:
        r = rows[name]
        fq = max(r["forget_quality"], 1e-30)
        method = r.get("method", name)
        ref = r.get("kind") == "reference"
        color = {"alter": "C3", "asymlora": "C1"}.get(method, "k" if ref else "C0")
        marker = "*" if method == "alter" else ("s" if ref else "o")
        variant = bool(r.get("overrides"))
        ax.scatter(r["model_utility"], fq, marker=marker, s=140 if marker == "*" else 55, zorder=3 if ref else 2,
                   facecolors="none" if variant else color, edgecolors=color, linewidths=1.3)
        if not variant or method in ("alter", "asymlora"):
            labels.append((r["model_utility"], fq, name))
    ax.set_yscale("log")
    ax.axhline(0.05, color="gray", ls="--", lw=0.8, label="FQ = 0.05")
    if "full" in rows:
        ax.axvline(0.9 * rows["full"]["model_utility"], color="gray", ls=":", lw=0.8, label="MU = 0.9 × full")
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="C0", label="baseline at another learning rate")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("Model Utility (retained authors: Prob., ROUGE, Truth Ratio)")
    ax.set_ylabel("Forget Quality (KS p-value, log scale)")
    ax.set_title("TOFU small (tiny Llama from scratch): forget quality vs model utility" if not_measurable is None
                 else "pipeline check only: the full model has not learned its data", fontsize=10)
    fig.tight_layout()
    place_labels(ax, labels, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver
def run_study(cfg: StudyConfig, command: str = "bin/study tofu-small", log: Callable[[str], None] = _log) -> dict:
    """Run every unfinished stage, then write the report. Returns ``{"report": ..., "ran": [stage, ...]}``."""
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / "study_config.json"
    spec = dataclasses.asdict(cfg)
    spec = {k: v for k, v in spec.items() if k not in ("out_dir", "work_dir", "methods", "variants")}
    if spec_file.is_file() and _read_json(spec_file) != json.loads(json.dumps(spec)):
        raise ValueError(f"{work} holds a study made with other settings ({spec_file}); pass another --work-dir "
                         "or delete that folder")
    _write_json(spec_file, spec)
    ran: list[str] = []
    data_dir = work / "data"
    if not (data_dir / "info.json").is_file():
        log("data: writing the TOFU subset")
        build_data(cfg, data_dir)
        ran.append("data")
    from alter_jax.study.fluency import copy_idk_answers

    copy_idk_answers(cfg.tofu_dir, data_dir)  # IdkNLL / IdkDPO read it from the subset
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        log("tokenizer: training")
        build_tokenizer(cfg, data_dir, tok_dir)
        ran.append("tokenizer")
    from alter_jax.io.hf import load_tokenizer

    tok = load_tokenizer(tok_dir)
    for split, name in (("full", "full"), ("retain", "retain")):
        dest = work / "models" / name
        if not (dest / "finetune.json").is_file():
            log(f"models/{name}: training from scratch on '{split}'")
            info = finetune_model(cfg, tok, data_dir, split, dest)
            log(f"models/{name}: {info['params'] / 1e6:.2f}M params, loss {info['final_loss']:.3f}, {info['wall_s']:.0f} s")
            ran.append(f"models/{name}")
    backbone: list = []  # the full model's LogitsFn, loaded once when an evaluation needs it

    def ppl_fn():
        if not backbone:
            backbone.append(model_fns_for("full", work)[1])
        return backbone[0]

    for name in ("full", "retain"):
        ev = work / "eval" / name
        if not _eval_done(ev):
            log(f"eval/{name}")
            tk, lf, gf = model_fns_for(name, work)
            s = evaluate_model(cfg, lf, gf, tk, data_dir, ev, ppl_logits_fn=ppl_fn())
            log(f"eval/{name}: MU {s['model_utility']:.3f}, forget ROUGE {s['forget_rouge']:.3f}")
            ran.append(f"eval/{name}")
    from alter_jax.train.loop import unlearn

    for name in variant_names(cfg):
        rd = work / "runs" / name
        if not (rd / "report.json").is_file():
            log(f"runs/{name}: unlearning")
            rep = unlearn(run_config(cfg, name, work / "models" / "full", data_dir, rd), progress=False,
                          log=lambda *_: None)
            log(f"runs/{name}: {rep['steps']} steps, {rep['wall_s']:.0f} s")
            ran.append(f"runs/{name}")
        ev = work / "eval" / name
        if not _eval_done(ev):
            log(f"eval/{name}")
            tk, lf, gf = model_fns_for(name, work)
            s = evaluate_model(cfg, lf, gf, tk, data_dir, ev, ppl_logits_fn=ppl_fn())
            log(f"eval/{name}: MU {s['model_utility']:.3f}, forget ROUGE {s['forget_rouge']:.3f}")
            ran.append(f"eval/{name}")
        write_report(cfg, work, command)
    report = write_report(cfg, work, command)
    log(f"report: {Path(cfg.out_dir) / 'report.md'}")
    return {"report": report, "ran": ran}


# ----------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    d = StudyConfig()
    p.add_argument("--out", default=None, help=f"report folder (default {d.out_dir}; --quick: <work-dir>/report)")
    p.add_argument("--work-dir", default=None, help=f"stage outputs (default {d.work_dir}; --quick: {d.work_dir}_quick)")
    p.add_argument("--tofu-dir", default=d.tofu_dir, help="local TOFU folder (full.json, *_perturbed.json)")
    p.add_argument("--authors", type=int, default=None, help=f"authors in the subset (default {d.authors})")
    p.add_argument("--forget-authors", type=int, default=None, help=f"last authors forgotten (default {d.forget_authors})")
    p.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(d.methods)})")
    p.add_argument("--no-variants", action="store_true", help="only the methods at their default settings")
    p.add_argument("--quick", action="store_true", help="few authors, 1 epoch, tiny eval, no variants (tests)")


def config_from_args(args) -> StudyConfig:
    kw: dict[str, Any] = {"tofu_dir": args.tofu_dir}
    if args.authors is not None:
        kw["authors"] = args.authors
    if args.forget_authors is not None:
        kw["forget_authors"] = args.forget_authors
    if args.methods:
        from alter_jax.train.methods import METHODS as ALL

        ms = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in ms if m not in ALL]
        if bad:
            raise SystemExit(f"study tofu-small: --methods: unknown {', '.join(bad)}; choose from {', '.join(ALL)}")
        kw["methods"] = ms
    if args.no_variants:
        kw["variants"] = ()
    d = StudyConfig()
    work = args.work_dir or (d.work_dir + "_quick" if args.quick else d.work_dir)
    kw["work_dir"] = work
    kw["out_dir"] = args.out or (str(Path(work) / "report") if args.quick else d.out_dir)
    return quick_config(**kw) if args.quick else StudyConfig(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import shlex
    import sys

    p = argparse.ArgumentParser(prog="study tofu-small", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "bin/study tofu-small" + ("" if not argv else " " + shlex.join(argv))
    try:
        cfg = config_from_args(args)
        run_study(cfg, command=command)
    except (ValueError, FileNotFoundError) as e:
        print(f"study tofu-small: {e}", file=sys.stderr)
        return 2
    return 0
