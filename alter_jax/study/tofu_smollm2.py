"""The powered TOFU study on the real pretrained SmolLM2-135M-Instruct (issue 16; fluency: issue 19).

Design (``StudyConfig`` holds every number; ``--plan`` prints the stages and their estimated time):

* **Authors** (blocks of 20 rows of TOFU's ``full.json``): forget = authors 198-199 (forget01, 40 rows);
  retain = authors 0-7 (160 rows, all in ``retain_perturbed``); membership holdout = authors 8-9, which no
  model here is trained on.
* **Models**: ``full`` = SmolLM2 fine-tuned (every parameter) on the 200 rows of the 10 authors; ``retain``
  = the same recipe on the 160 retain rows; ``untouched`` = SmolLM2 itself.
* **Reported evaluation** (``eval/<name>``): every forget row; rows 0-4 of each retained author (40); real
  authors rows 0-39 and world facts rows 0-39; greedy answers of 200 new tokens (open-unlearning's budget);
  the whole metric set of :mod:`alter_jax.eval.tofu` (Forget Quality against the retain model, Model
  Utility and its 9 parts, ROUGE, truth ratio both ways, Extraction Strength, Exact Memorization, PrivLeak
  of Min-K% against the holdout authors, fluency) and the ROUGE of answers to the forget rows'
  ``paraphrased_question``.
* **Validation evaluation** (``val/<name>``, the selection rule only): the same forget rows (Forget Quality
  needs no generation), rows 5-7 of each retained author, real authors rows 40-59, world facts rows 40-59:
  disjoint from the reported utility rows; greedy answers of ``select_new_tokens``.
* **Methods**: every method gets ``unlearn_epochs`` epochs over the 40 forget rows at batch 4 forget + 4
  retain (the same number of steps) and a sweep over ``lrs_full`` (full-parameter methods) or ``lrs_lora``
  (LoRA B / ALTER's experts); ALTER then changes one of the paper's open settings at a time (entropy
  threshold, q, N, ``retain_bias``) from its selected learning rate.
* **Selection rule** (``SELECTION_RULE``, written to ``plan.json`` before any run): per method, among its
  sweep points (seed 0) with validation MU ≥ ``mu_floor`` × the full model's validation MU, the highest
  Forget Quality (ties: higher validation MU); if none keeps that utility, the highest hmean(FQ, MU/full),
  flagged. The best setting is then run with every seed in ``seeds`` and evaluated (reported rows).
* **Relearning attack** on each best setting (seed 0): :func:`alter_jax.eval.relearn.relearn` in ``full``
  mode (every parameter, the same attacker for every method) on half the forget rows, k ∈ ``relearn_steps``,
  forget Prob. / ROUGE on the other half.

Stages run method by method (sweep → selection → seeds → relearning) so that every finished method is
complete. Each stage writes a small record into ``<out_dir>/stages/`` (committed with the report) and
appends ``{stage, wall_s, at, command}`` to ``stages.jsonl``; a rerun skips stages whose record exists, rebuilding
only what a later stage needs (the fine-tuned models, a best run's folder) when the work folder was lost.
``--max-minutes`` stops before a stage that would start after the limit. Big outputs (models, run
folders, evaluation logs) stay in ``work_dir``; a method's run folders are deleted once it is done.

**Two workers.** One process keeps ~1.3 of the 2 cores busy; a second, started with ``--only M1,M2
--work-dir W2 --models-from W1``, runs other methods into the same ``out_dir`` (records are per stage,
written atomically) on the first worker's fine-tuned models. Give the workers disjoint methods: a stage
has no lock, so two workers on one method would both train it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# run order: ALTER first (the claim), then the baselines that came closest in the issue-8 study
METHODS = ("alter", "asymlora", "graddiff", "npo_gd", "simnpo", "lora_gd", "rmu", "npo", "ga")
LORA_METHODS = ("alter", "asymlora", "lora_gd")
SELECTION_RULE = (
    "Per method, among its sweep points (seed 0) whose validation Model Utility is at least mu_floor x the full "
    "model's validation Model Utility, the highest Forget Quality (ties: the higher validation MU). If no point "
    "keeps that utility, the highest hmean(FQ, MU / MU_full), and the method is flagged 'below the utility floor'. "
    "Validation MU uses retained-author rows 5-7 per author, real-author rows 40-59 and world-fact rows 40-59, none "
    "of which the reported Model Utility uses. ALTER's one-at-a-time variants start from its selected learning rate "
    "and compete with its learning-rate points under the same rule.")
GOAL = ("ALTER's best setting reaches Forget Quality >= 0.05 with Model Utility >= 90 % of full (mean over seeds); "
        "ALTER's Pareto frontier lies above every baseline's wherever utility is >= 90 % of full; ALTER recovers "
        "less under relearning than the best baseline (forget Prob. at the largest k).")
# ALTER's settings the paper leaves open: (label, field, default, variant value)
ALTER_OPEN = (("thr", "threshold", 0.3, 0.5), ("q", "q", 1.0, 2.0), ("N", "num_subdomains", 2, 3),
              ("rb", "retain_bias", 2.0, 0.0))
RETAIN_BIAS_DEFAULT = 2.0


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Scale and settings of the study (defaults = the committed run)."""

    model: str = "smollm2-135m-instruct"
    tofu_dir: str = "../shared/data/tofu"
    work_dir: str = "runs/study_smollm2"
    out_dir: str = "studies/tofu_smollm2"
    forget_authors: tuple[int, ...] = (198, 199)  # forget01's authors
    retain_authors: tuple[int, ...] = tuple(range(8))
    holdout_authors: tuple[int, ...] = (8, 9)
    rows_per_author: int = 20  # 0 < n <= 20: the first n rows of each author (--quick cuts it)
    eval_per_author: int = 5  # retained authors: rows [0, n) reported
    eval_real_rows: int = 40  # real authors / world facts: rows [0, n) reported
    # validation (selection only): retained-author rows [n, n + val_per_author), real authors / world
    # facts rows [m, m + val_real_rows); smaller than the reported slices (an evaluation costs ~5 min)
    val_per_author: int = 3
    val_real_rows: int = 20
    max_length: int = 128
    max_new_tokens: int = 200  # reported answers (open-unlearning's budget)
    select_new_tokens: int = 48  # validation answers
    eval_batch: int = 40
    ft_epochs: int = 3
    ft_lr: float = 2e-4
    ft_batch: int = 8
    unlearn_epochs: int = 5
    unlearn_batch: int = 4
    lrs_full: tuple[float, ...] = (1e-5, 3e-5, 1e-4)
    lrs_lora: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    methods: tuple[str, ...] = METHODS
    alter_variants: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    mu_floor: float = 0.9
    relearn_steps: tuple[int, ...] = (0, 2, 5, 10)
    relearn_lr: float = 1e-4
    max_minutes: float = 0.0  # 0 = no limit
    keep_runs: bool = False
    # A second worker (``--only``, ``--models-from``): the methods this process runs (default: all of
    # ``methods``; the plan and the report keep the whole design), and the work folder of the worker whose
    # fine-tuned models and data subset this one reads (it waits for them instead of building its own).
    only: tuple[str, ...] = ()
    models_from: str = ""


QUICK = dict(rows_per_author=2, eval_per_author=1, eval_real_rows=2, val_per_author=1, val_real_rows=2, max_length=128, max_new_tokens=8,
             select_new_tokens=4, eval_batch=8, ft_epochs=1, ft_batch=4, unlearn_epochs=1, unlearn_batch=2,
             lrs_full=(1e-5,), lrs_lora=(1e-3, 3e-3), methods=("alter", "ga"), seeds=(0, 1), relearn_steps=(0, 1),
             work_dir="runs/study_smollm2_quick", out_dir="runs/study_smollm2_quick/out")


def quick_config(**kw) -> StudyConfig:
    """The ``--quick`` scale: 2 rows per author, 1 epoch, alter (2 lrs + its variants) and ga, 2 seeds."""
    return StudyConfig(**{**QUICK, **kw})


# ----------------------------------------------------------------------------- small helpers
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text())


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fmt(v, p=3):
    if v is None:
        return "—"
    if isinstance(v, float) and (abs(v) < 1e-3 and v != 0):
        return f"{v:.1e}"
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)


def mu_text(mu: float | None, parts: dict[str, float] | None) -> str:
    """Model Utility for a table or log line. A harmonic mean is 0 as soon as one part is 0, which at
    ``--quick`` scale says nothing about the model: then the text names the part (issue 14)."""
    zero = sorted(k for k, v in (parts or {}).items() if v == 0)
    if mu == 0 and zero:
        return f"n/a ({zero[0]} = 0{' and more' if len(zero) > 1 else ''})"
    return _fmt(mu)


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """One unlearning run: the method, its learning rate, ALTER's open settings and the seed."""

    method: str
    lr: float
    threshold: float = 0.3
    q: float = 1.0
    num_subdomains: int = 2
    retain_bias: float = 2.0
    seed: int = 0

    @property
    def name(self) -> str:
        out = f"{self.method}_lr{self.lr:g}"
        for label, field, default, _ in ALTER_OPEN:
            v = getattr(self, field)
            if v != default:
                out += f"_{label}{v:g}"
        return out + (f"_s{self.seed}" if self.seed else "")

    def with_seed(self, seed: int) -> "Setting":
        return dataclasses.replace(self, seed=seed)

    @property
    def trained(self) -> "Setting":
        """The run that ``self`` evaluates: ``retain_bias`` is an inference-time router offset (training
        never reads it), so settings that differ only there share one trained run."""
        return dataclasses.replace(self, retain_bias=RETAIN_BIAS_DEFAULT)

    def public(self) -> dict[str, Any]:
        d = {"method": self.method, "lr": self.lr}
        if self.method in ("alter", "asymlora"):
            d.update(num_subdomains=self.num_subdomains, retain_bias=self.retain_bias)
        if self.method == "alter":
            d.update(threshold=self.threshold, q=self.q)
        return d


def lr_sweep(cfg: StudyConfig, method: str) -> list[Setting]:
    """The learning-rate points of one method (seed 0, ALTER's open settings at their defaults)."""
    lrs = cfg.lrs_lora if method in LORA_METHODS else cfg.lrs_full
    return [Setting(method, lr) for lr in lrs]


def alter_variants(best_lr: Setting) -> list[Setting]:
    """ALTER's one-at-a-time variants of the paper's open settings, from its selected learning rate."""
    return [dataclasses.replace(best_lr, **{field: value}) for _, field, _, value in ALTER_OPEN]


# ----------------------------------------------------------------------------- data
def _author_rows(cfg: StudyConfig, blocks, authors) -> list[dict]:
    return [r for a in authors for r in blocks[a][: cfg.rows_per_author]]


def build_data(cfg: StudyConfig, dest: Path) -> dict[str, int]:
    """Write the training / reported-evaluation TOFU-layout folder ``dest`` and the validation folder
    ``dest/../data_val``; returns the row counts. Training: ``forget`` (40 rows), ``retain`` (160), ``full``
    (200). Evaluation: ``forget_perturbed``, ``retain_perturbed``, ``real_authors_perturbed``,
    ``world_facts_perturbed``; ``holdout`` (authors the models never saw)."""
    from alter_jax.data.tofu import author_blocks, load_tofu_split

    src = cfg.tofu_dir
    full = load_tofu_split("full", src)
    blocks = author_blocks(full)
    perturbed = {r["question"]: r for r in load_tofu_split("retain_perturbed", src)}
    perturbed.update({r["question"]: r for r in load_tofu_split("forget01_perturbed", src)})
    perturbed.update({r["question"]: r for r in load_tofu_split("forget10_perturbed", src)})
    forget = _author_rows(cfg, blocks, cfg.forget_authors)
    retain = _author_rows(cfg, blocks, cfg.retain_authors)
    missing = [r["question"] for r in forget + retain if r["question"] not in perturbed]
    if missing:
        raise ValueError(f"study authors: {len(missing)} rows have no perturbed answers in {src} (retain_perturbed / "
                         f"forget10_perturbed), e.g. {missing[0]!r}; choose retain_authors from 0-19 and forget authors "
                         "from 180-199")
    n = cfg.eval_per_author
    per_author = [[perturbed[r["question"]] for r in blocks[a][: cfg.rows_per_author]] for a in cfg.retain_authors]
    retain_eval = [r for rows in per_author for r in rows[:n]]
    retain_val = [r for rows in per_author for r in rows[n:n + cfg.val_per_author]]
    m = cfg.eval_real_rows
    real, world = load_tofu_split("real_authors_perturbed", src), load_tofu_split("world_facts_perturbed", src)
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    forget_p = [perturbed[r["question"]] for r in forget]
    common = {"forget_perturbed": forget_p, "forget": qa(forget), "retain": qa(retain), "full": qa(forget + retain),
              "holdout": qa(_author_rows(cfg, blocks, cfg.holdout_authors))}
    folders = {
        dest: {**common, "retain_perturbed": retain_eval, "real_authors_perturbed": real[:m],
               "world_facts_perturbed": world[:m]},
        val_dir(dest): {**common, "retain_perturbed": retain_val,
                        "real_authors_perturbed": real[m:m + cfg.val_real_rows],
                        "world_facts_perturbed": world[m:m + cfg.val_real_rows]},
    }
    counts: dict[str, int] = {}
    for folder, splits in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in splits.items():
            _write_json(folder / f"{name}.json", rows)
        tag = "" if folder == dest else "val_"
        counts.update({tag + k: len(v) for k, v in splits.items() if not tag or k not in common})
    return counts


def val_dir(data_dir: Path) -> Path:
    return data_dir.parent / "data_val"


# ----------------------------------------------------------------------------- stage pieces
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
                             weight_decay=0.01, warmup_frac=1.0 / max(cfg.ft_epochs, 2), seed=0,
                             progress=False, desc=f"finetune[{split}]")
    tmp = dest.with_name(dest.name + ".partial")
    save_pretrained(model, tmp, tokenizer=tok)
    info = {"split": split, "rows": len(rows), "epochs": cfg.ft_epochs, "lr": cfg.ft_lr, "batch_size": cfg.ft_batch,
            "steps": len(losses), "first_loss": losses[0], "final_loss": float(np.mean(losses[-3:])),
            "wall_s": time.perf_counter() - t0}
    _write_json(tmp / "finetune.json", info)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return info


def run_config(cfg: StudyConfig, s: Setting, model_dir: Path, data_dir: Path, out: Path):
    """The ``RunConfig`` of one unlearning run (same data, epochs and batch for every method)."""
    from alter_jax import config as C
    from alter_jax.adapters.lora import AdapterConfig

    return C.RunConfig(
        # one length bucket (= max_length): every batch has one shape, so each run compiles its step once
        # (a compile of the SmolLM2 step costs 45-120 s here; the padding it adds costs less)
        model=C.ModelSpec(name=str(model_dir), prompt_format="auto", max_length=cfg.max_length,
                          length_bucket=cfg.max_length),
        adapter=AdapterConfig(retain_bias=s.retain_bias),
        entropy=C.EntropyConfig(threshold="quantile", value=s.threshold, q=s.q),
        optim=C.OptimConfig(lr=s.lr, lr_b=s.lr),
        data=C.DataConfig(source=str(data_dir), forget_split="forget", retain_split="retain",
                          num_subdomains=s.num_subdomains),
        train=C.TrainConfig(method=s.method, epochs=cfg.unlearn_epochs, batch_size=cfg.unlearn_batch, seed=s.seed,
                            checkpoint_every=1000),
        eval=C.EvalConfig(batch_size=cfg.eval_batch, max_new_tokens=4, num_questions=2),
        output_dir=str(out),
    )


def evaluate_model(cfg: StudyConfig, fns, data_dir: Path, out: Path, *, reported: bool, ppl_logits_fn,
                   retain_logs: Path | None) -> dict[str, Any]:
    """The TOFU metric set of one model into ``out`` (legacy logs, TOFU_EVAL.json, summary.json) and, for a
    reported evaluation, the paraphrased-question ROUGE (``paraphrase.json``) and the membership attacks
    against the holdout authors. Returns the compact figures (:func:`figures`)."""
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.eval.tofu import evaluate_tofu, generate_answers, rouge_recall

    lf, gf, tok = fns
    t0 = time.perf_counter()
    holdout = load_tofu_split("holdout", str(data_dir)) if reported else None
    evaluate_tofu(lf, gf, tok, out, forget_split="forget", source=str(data_dir), ds_size=None,
                  batch_size=cfg.eval_batch, max_length=cfg.max_length,
                  max_new_tokens=cfg.max_new_tokens if reported else cfg.select_new_tokens, progress=False,
                  holdout=holdout, attacks=("loss", "zlib", "min_k", "min_k_plus_plus") if reported else (),
                  retain_logs=retain_logs, ppl_logits_fn=ppl_logits_fn, ppl_reference=f"untouched {cfg.model}")
    if reported:
        rows = load_tofu_split("forget_perturbed", str(data_dir))
        _, gens = generate_answers(gf, tok, [r["paraphrased_question"] for r in rows], batch_size=cfg.eval_batch,
                                   max_new_tokens=cfg.max_new_tokens)
        _, rl = rouge_recall(gens, [r["answer"] for r in rows])
        _write_json(out / "paraphrase.json", {"rougeL_recall": rl, "generated": gens})
    fig = figures(out, retain_logs)
    fig["eval_wall_s"] = time.perf_counter() - t0
    return fig


def figures(folder: Path, retain_logs: Path | None) -> dict[str, Any]:
    """The compact record of one evaluation folder: every headline metric, MU's parts, fluency and 3 + 3
    example answers (:mod:`alter_jax.study.fluency`)."""
    from alter_jax.eval.tofu import aggregate
    from alter_jax.study.fluency import folder_fluency

    agg = aggregate(folder, retain_logs)
    m = agg["metrics"]
    f = m.get("forget", {})
    e = {"forget_quality": agg["forget_quality"], "model_utility": agg["model_utility"], "mu_parts": agg["parts"],
         "forget_prob": f.get("prob"), "forget_rouge": f.get("rouge_l_recall"),
         "forget_truth_ratio": f.get("truth_ratio"), "forget_truth_ratio_prob_mean": f.get("truth_ratio_prob_mean"),
         "extraction_strength": f.get("extraction_strength"), "exact_memorization": f.get("exact_memorization"),
         "privleak": m.get("privleak"), "mia_min_k_auc": m.get("mia_min_k_auc"),
         "retain_rouge": m.get("retain", {}).get("rouge_l_recall"), **folder_fluency(folder)}
    para = folder / "paraphrase.json"
    e["paraphrase_rouge"] = float(np.mean(_read_json(para)["rougeL_recall"])) if para.is_file() else None
    return e


def selection(points: Sequence[dict], full_val_mu: float, mu_floor: float) -> tuple[int, bool]:
    """Index of the best point under :data:`SELECTION_RULE` and whether it kept the utility floor.
    ``points``: ``{"forget_quality", "model_utility"}`` of validation evaluations."""
    if not points:
        raise ValueError("selection: no sweep points")
    rel = [(p["model_utility"] or 0.0) / full_val_mu if full_val_mu else 0.0 for p in points]
    fq = [p["forget_quality"] or 0.0 for p in points]
    ok = [i for i, r in enumerate(rel) if r >= mu_floor]
    if ok:
        return max(ok, key=lambda i: (fq[i], rel[i])), True
    hm = [2 * q * r / (q + r) if q > 0 and r > 0 else 0.0 for q, r in zip(fq, rel)]
    return max(range(len(points)), key=lambda i: (hm[i], rel[i])), False


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated ``(mu, fq)`` points (higher is better in both), by decreasing utility."""
    out: list[tuple[float, float]] = []
    for mu, fq in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not out or fq > out[-1][1]:
            out.append((mu, fq))
    return out


def frontier_at(frontier: Sequence[tuple[float, float]], u: float) -> float:
    """Best Forget Quality the frontier reaches at utility ≥ ``u`` (0 when none)."""
    return max((fq for mu, fq in frontier if mu >= u), default=0.0)


def pareto_verdict(sweeps: dict[str, list[tuple[float, float]]], floor: float) -> dict[str, Any]:
    """Does ALTER's frontier lie above every baseline's wherever MU/full ≥ ``floor``? Compared at every
    sweep point's utility ≥ floor: ALTER's best FQ at utility ≥ u vs each baseline's. Returns per baseline
    the utilities where ALTER is below, and the overall verdict."""
    if "alter" not in sweeps:
        return {"met": None, "why": "ALTER not finished"}
    fronts = {m: pareto_frontier([p for p in pts if p[0] >= floor]) for m, pts in sweeps.items()}
    grid = sorted({mu for pts in sweeps.values() for mu, _ in pts if mu >= floor})
    per: dict[str, Any] = {}
    for m, fr in fronts.items():
        if m == "alter":
            continue
        below = [u for u in grid if frontier_at(fronts["alter"], u) < frontier_at(fr, u)]
        per[m] = {"alter_below_at_mu": below, "alter_best_fq": frontier_at(fronts["alter"], floor),
                  "baseline_best_fq": frontier_at(fr, floor)}
    return {"met": all(not v["alter_below_at_mu"] for v in per.values()) if per else None, "per_baseline": per}


def training_summary(metrics_file: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per phase (ALTER's ``phase1``, then ``main``) and logged term of a run's ``metrics.jsonl``: the
    term's first and last value, min and max, so that a collapse (ALTER seed 1) can be read from the
    committed stage record after ``runs/`` is gone. ``{}`` when the file is missing (a non-main process)."""
    if not metrics_file.is_file():
        return {}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for phase in dict.fromkeys(r.get("phase", "main") for r in rows):  # phases in the order they ran
        terms: dict[str, list[float]] = {}
        for r in rows:
            if r.get("phase", "main") == phase:
                for k, v in r.items():
                    if isinstance(v, (int, float)) and k not in ("step", "epoch", "tokens_per_s"):
                        terms.setdefault(k, []).append(float(v))
        out[phase] = {k: {"first": v[0], "last": v[-1], "min": min(v), "max": max(v)} for k, v in sorted(terms.items())}
    return out


# ----------------------------------------------------------------------------- the runner
class Study:
    """Runs (or resumes) the stages; records in ``out/stages``, big outputs in ``work``."""

    def __init__(self, cfg: StudyConfig, command: str, log: Callable[[str], None] = _log):
        self.cfg, self.command, self.log = cfg, command, log
        self.work, self.out = Path(cfg.work_dir), Path(cfg.out_dir)
        self.stages = self.out / "stages"
        self.shared = Path(cfg.models_from) if cfg.models_from else self.work  # models + data subset
        self.data_dir = self.shared / "data"
        self.t_start = time.perf_counter()
        self._ppl = None

    # bookkeeping
    def record(self, name: str) -> dict | None:
        f = self.stages / f"{name}.json"
        return _read_json(f) if f.is_file() else None

    def save(self, name: str, rec: dict, wall_s: float) -> dict:
        _write_json(self.stages / f"{name}.json", rec)
        with open(self.out / "stages.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": name, "wall_s": round(wall_s, 1), "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "command": self.command}) + "\n")
        self.write_report()  # the report always shows every finished stage (a few seconds: tables and plots)
        return rec

    def out_of_time(self) -> bool:
        """``--max-minutes`` reached, or a ``STOP`` file in the work folder (stop at the next stage)."""
        lim = self.cfg.max_minutes
        return (bool(lim) and (time.perf_counter() - self.t_start) / 60.0 >= lim) or self.stop_file.exists()

    @property
    def stop_file(self) -> Path:
        """Its presence stops the study at the next stage (an operator's clean stop)."""
        return self.work / "STOP"

    def ppl_fn(self):
        """The untouched SmolLM2's logits: scores every model's greedy answers (generated perplexity)."""
        if self._ppl is None:
            from alter_jax.generate import model_fns
            from alter_jax.io.hf import load_pretrained
            from alter_jax.train.loop import resolve_run_model

            self._ppl = model_fns(load_pretrained(resolve_run_model(self.cfg.model, progress=False)))[0]
        return self._ppl

    # stages
    def wait_for(self, path: Path, what: str, poll_s: float = 20.0) -> None:
        """Wait until the first worker (``--models-from``) has written ``path``; ``_Stopped`` on a STOP
        file or ``--max-minutes`` meanwhile."""
        if path.is_file():
            return
        self.log(f"waiting for {what} ({path}, written by the worker whose --work-dir is {self.shared})")
        while not path.is_file():
            if self.out_of_time():
                raise _Stopped(f"stopped while waiting for {path}")
            time.sleep(poll_s)

    def methods(self) -> tuple[str, ...]:
        """The methods this session runs, in the design's order (``only`` restricts them)."""
        return tuple(m for m in self.cfg.methods if not self.cfg.only or m in self.cfg.only)

    def data(self) -> None:
        """Build the data subset (first worker) or wait for it (a second worker, which never writes into
        the first one's folders). ``counts.json`` is written last: a waiting worker sees a whole subset."""
        if self.cfg.models_from:
            self.wait_for(self.data_dir / "counts.json", "the data subset")
            self.wait_for(val_dir(self.data_dir) / "holdout.json", "the validation subset")
            return
        from alter_jax.study.fluency import copy_idk_answers

        built = (self.data_dir / "counts.json").is_file() and (val_dir(self.data_dir) / "holdout.json").is_file()
        counts = None if built else build_data(self.cfg, self.data_dir)
        copy_idk_answers(self.cfg.tofu_dir, self.data_dir)  # idempotent: older subsets get the file too
        if counts is not None:
            _write_json(self.data_dir / "counts.json", counts)
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "plan.json", plan(self.cfg))  # the design record is the first worker's

    def model_dir(self, name: str) -> Path:
        """``models/<name>`` (fine-tuned now if missing: its record exists from an earlier session; a second
        worker waits for the first one's)."""
        d = self.shared / "models" / name
        if self.cfg.models_from:
            self.wait_for(d / "finetune.json", f"the fine-tuned {name} model")
        elif not (d / "finetune.json").is_file():
            self.log(f"finetune {name}")
            t = time.perf_counter()
            info = finetune_model(self.cfg, name, self.data_dir, d)
            self.log(f"finetune {name}: loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} ({info['wall_s']:.0f} s)")
            if self.record(f"finetune_{name}") is None:
                self.save(f"finetune_{name}", info, time.perf_counter() - t)
        return d

    def retain_logs(self) -> Path:
        """The retain model's reported forget log + MIA (FQ and PrivLeak reference), kept in ``out``."""
        return self.out / "retain_logs"

    def eval_stage(self, name: str, load: Callable[[], tuple], reported: bool) -> dict:
        key = f"{'eval' if reported else 'val'}_{name}"
        rec = self.record(key)
        if rec is not None:
            return rec
        t = time.perf_counter()
        folder = self.work / ("eval" if reported else "val") / name
        data = self.data_dir if reported else val_dir(self.data_dir)
        is_retain = name == "retain" and reported
        rl = None if is_retain else self.retain_logs()
        if rl is not None and not (rl / "eval_log_forget.json").is_file():
            raise RuntimeError(f"{rl}: the retain model's logs are missing; the retain evaluation runs first")
        self.log(f"{key}")
        rec = evaluate_model(self.cfg, load(), data, folder, reported=reported, ppl_logits_fn=self.ppl_fn(),
                             retain_logs=rl)
        if is_retain:  # keep what FQ / PrivLeak need beside the report, then score retain against itself
            rl = self.retain_logs()
            rl.mkdir(parents=True, exist_ok=True)
            for f in ("eval_log_forget.json", "TOFU_EVAL.json"):
                shutil.copy(folder / f, rl / f)
            rec = figures(folder, rl)
            rec["eval_wall_s"] = time.perf_counter() - t
        self.log(f"{key}: FQ {_fmt(rec['forget_quality'])} MU {mu_text(rec['model_utility'], rec['mu_parts'])} "
                 f"forget ROUGE {_fmt(rec['forget_rouge'])} degenerate {_fmt(rec.get('forget_degenerate'))} "
                 f"({time.perf_counter() - t:.0f} s)")
        return self.save(key, rec, time.perf_counter() - t)

    def folder_fns(self, folder_fn: Callable[[], Path]):
        """A lazy loader of a model folder: a stage whose record exists neither loads nor rebuilds it."""
        def load():
            from alter_jax.generate import model_fns
            from alter_jax.io.hf import load_pretrained, load_tokenizer

            folder = folder_fn()
            lf, gf = model_fns(load_pretrained(folder))
            return lf, gf, load_tokenizer(folder)
        return load

    def run_dir(self, s: Setting) -> Path:
        """The finished run folder of ``s.trained`` (trained now if missing); records ``run_<name>``."""
        from alter_jax.train.loop import unlearn

        s = s.trained
        rd = self.work / "runs" / s.name
        if not (rd / "report.json").is_file():
            if rd.exists():
                shutil.rmtree(rd)  # a run interrupted mid-way restarts: stages are whole runs
            self.log(f"unlearn {s.name}")
            t = time.perf_counter()
            logs = self.work / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / f"{s.name}.log", "a", encoding="utf-8") as fh:  # the trainer's own log, per run
                r = unlearn(run_config(self.cfg, s, self.model_dir("full"), self.data_dir, rd), progress=False,
                            log=lambda *a: print(*a, file=fh, flush=True))
            self.log(f"unlearn {s.name}: {r['steps']} steps, {r['wall_s']:.0f} s")
            if self.record(f"run_{s.name}") is None:
                self.save(f"run_{s.name}", {"setting": s.public(), "seed": s.seed, "steps": r["steps"],
                                             "wall_s": r["wall_s"], "warnings": r.get("warnings", []),
                                             "training": training_summary(rd / "metrics.jsonl")},
                          time.perf_counter() - t)
        return rd

    def run_fns(self, s: Setting):
        def load():
            from alter_jax.train.loop import load_run_result

            model, tok, lf, gf = load_run_result(self.run_dir(s))
            if s.retain_bias != s.trained.retain_bias:  # the trained run, evaluated with this router offset
                from alter_jax.eval.routing import replace_adapter_fields

                replace_adapter_fields(model, retain_bias=s.retain_bias)
            return lf, gf, tok
        return load

    def point(self, s: Setting, reported: bool) -> dict:
        rec = self.eval_stage(s.name, self.run_fns(s), reported)
        return {**rec, "setting": s.public(), "seed": s.seed, "name": s.name}

    def relearn_stage(self, method: str, s: Setting) -> dict:
        key = f"relearn_{method}"
        rec = self.record(key)
        if rec is not None:
            return rec
        from alter_jax.eval.relearn import RelearnConfig, relearn

        t = time.perf_counter()
        self.log(f"relearn {s.name}")
        from alter_jax.eval.relearn import load_run

        rd = self.run_dir(s)
        loaded = load_run(rd)
        if s.retain_bias != s.trained.retain_bias:  # as evaluated: the trained run with this router offset
            from alter_jax.eval.routing import replace_adapter_fields

            replace_adapter_fields(loaded.model, retain_bias=s.retain_bias)
        res = relearn(rd, RelearnConfig(steps=self.cfg.relearn_steps, mode="full", lr=self.cfg.relearn_lr,
                                                     max_new_tokens=self.cfg.select_new_tokens,
                                                     eval_batch_size=self.cfg.eval_batch),
                      out=self.work / "relearn" / method, progress=False, log=lambda *_: None, loaded=loaded)
        curve = [{"steps": r["k"], "forget_prob": r["prob"], "forget_rouge": r["rouge_l_recall"],
                  "forget_truth_ratio": r.get("truth_ratio"), "retain_prob": r.get("retain_prob")}
                 for r in res["schedule"]]
        rec = {"setting": s.public(), "mode": "full", "lr": res["lr"], "curve": curve,
               "base": {k: (res["base"] or {}).get(k) for k in ("prob", "rouge_l_recall")},
               "eval_rows": len(res["split"]["eval"]), "train_rows": len(res["split"]["train"])}
        self.log(f"relearn {s.name}: forget Prob. " + " ".join(f"k={c['steps']}:{c['forget_prob']:.3f}" for c in curve))
        return self.save(key, rec, time.perf_counter() - t)

    def method_stage(self, method: str, full_val_mu: float) -> bool:
        """Sweep, selection, seeds and relearning of one method; False when stopped by ``max_minutes``."""
        cfg = self.cfg
        pts = []
        for s in lr_sweep(cfg, method):
            if self.record(f"val_{s.name}") is None and self.out_of_time():
                return False
            pts.append(self.point(s, reported=False))
        if method == "alter" and cfg.alter_variants:
            i, _ = selection(pts, full_val_mu, cfg.mu_floor)
            for s in alter_variants(Setting(**{**pts[i]["setting"], "seed": 0})):
                if self.record(f"val_{s.name}") is None and self.out_of_time():
                    return False
                pts.append(self.point(s, reported=False))
        i, kept = selection(pts, full_val_mu, cfg.mu_floor)
        best = Setting(**{**pts[i]["setting"], "seed": 0})
        for seed in cfg.seeds:
            if self.record(f"eval_{best.with_seed(seed).name}") is None and self.out_of_time():
                return False
            self.point(best.with_seed(seed), reported=True)
        if self.record(f"relearn_{method}") is None and self.out_of_time():
            return False
        self.relearn_stage(method, best)
        if not cfg.keep_runs:
            shutil.rmtree(self.work / "runs", ignore_errors=True)
        self.log(f"{method}: best {best.name} ({'kept' if kept else 'below'} the utility floor)")
        return True

    def stop_reason(self) -> str:
        return (f"{self.stop_file} exists (delete it)" if self.stop_file.exists()
                else f"--max-minutes {self.cfg.max_minutes:g} reached")

    def run(self) -> dict:
        try:
            return self._run()
        except _Stopped as e:
            self.log(f"{e}: {self.stop_reason()}; rerun to continue")
            return self.write_report()

    def _run(self) -> dict:
        self.data()
        self.log(f"data {_read_json(self.data_dir / 'counts.json')}")
        self.write_report()
        full = self.folder_fns(lambda: self.model_dir("full"))
        self.eval_stage("retain", self.folder_fns(lambda: self.model_dir("retain")), True)
        self.eval_stage("full", full, True)
        self.eval_stage("untouched", self.folder_fns(lambda: _untouched_folder(self.cfg)), True)
        full_val = self.eval_stage("full", full, False)
        self.write_report()
        for method in self.methods():
            done = self.method_stage(method, full_val["model_utility"])
            self.write_report()
            if not done:
                self.log(f"stopped: {self.stop_reason()}; rerun to continue")
                break
        rep = self.write_report()
        self.log(f"report written to {self.out} ({len(rep['missing'])} stages missing)")
        return rep

    def write_report(self) -> dict:
        rep = collect(self.cfg, self.out)
        rep["command"] = design_command(self.command)
        rep["written_by"] = self.command
        write_report(self.cfg, self.out, rep)
        return rep


class _Stopped(Exception):
    """A STOP file or ``--max-minutes`` while a worker waited for another's output."""


def _untouched_folder(cfg: StudyConfig) -> Path:
    from alter_jax.train.loop import resolve_run_model

    return resolve_run_model(cfg.model, progress=False)


# ----------------------------------------------------------------------------- plan
# Wall seconds on the 2-core VM (2026-12-02; measured where marked, else scaled from bench_epoch.json's
# per-step times): one whole unlearning run (load, entropy / reference pre-pass, compile, 50 steps, the
# run's own check, export), and one evaluation of a plain or an entropy-gated (ALTER / AsymLoRA: a backbone
# prefill for S, then the gated forward) model.
RUN_S = {"alter": 467.0, "asymlora": 330.0, "lora_gd": 300.0, "ga": 230.0, "npo": 260.0, "graddiff": 330.0,
         "npo_gd": 350.0, "simnpo": 330.0, "rmu": 260.0}  # alter measured
GATED = ("alter", "asymlora")
EVAL_S = {("val", False): 160.0, ("val", True): 409.0, ("reported", False): 316.0, ("reported", True): 800.0}
FT_S = 342.0 + 400.0  # retain (measured) + full (200 rows; measured 722 s while tests shared the CPU)
RELEARN_S = 420.0


def unlearn_steps(cfg: StudyConfig) -> int:
    """Optimizer steps of every unlearning run: epochs x forget batches."""
    return cfg.unlearn_epochs * math.ceil(len(cfg.forget_authors) * cfg.rows_per_author / cfg.unlearn_batch)


# how one session runs, not the design: kept out of plan.json
SESSION_FIELDS = ("max_minutes", "keep_runs", "only", "models_from")


def plan(cfg: StudyConfig) -> dict[str, Any]:
    """Every stage with its estimated minutes (the constants above; the real times land in
    ``stages.jsonl``), the selection rule and the goal."""
    steps = unlearn_steps(cfg)
    stages = [{"stage": "finetune full + retain", "minutes": FT_S / 60, "keys": ["finetune_full", "finetune_retain"]},
              {"stage": "eval retain, full, untouched (reported) + full (validation)",
               "minutes": (3 * EVAL_S[("reported", False)] + EVAL_S[("val", False)]) / 60,
               "keys": ["eval_retain", "eval_full", "eval_untouched", "val_full"]}]
    n_runs = 0
    for m in cfg.methods:
        n_lr = len(cfg.lrs_lora if m in LORA_METHODS else cfg.lrs_full)
        n_var = len(ALTER_OPEN) if m == "alter" and cfg.alter_variants else 0
        n_train = n_lr + max(n_var - 1, 0)  # the retain_bias variant reuses a trained run
        n_seed = len(cfg.seeds) - 1
        gated = m in GATED
        mins = ((n_train + n_seed) * RUN_S.get(m, 330.0) + (n_lr + n_var) * EVAL_S[("val", gated)]
                + len(cfg.seeds) * EVAL_S[("reported", gated)] + RELEARN_S) / 60
        stages.append({"stage": f"{m}: {n_lr + n_var} sweep points ({n_train} trained) + {n_seed} seeds + relearning",
                       "minutes": mins, "keys": [f"relearn_{m}"]})
        n_runs += n_train + n_seed
    return {"scale": {"forget_rows": len(cfg.forget_authors) * cfg.rows_per_author,
                      "retain_rows": len(cfg.retain_authors) * cfg.rows_per_author, "unlearn_steps": steps,
                      "runs": n_runs, "seeds": list(cfg.seeds)},
            "stages": stages, "total_minutes": sum(s["minutes"] for s in stages),
            "selection_rule": SELECTION_RULE, "mu_floor": cfg.mu_floor, "goal": GOAL,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SESSION_FIELDS}}


def plan_text(p: dict, out_dir: Path | None = None) -> str:
    """The plan as text; with ``out_dir``, finished stages (their last record exists) are marked and the
    measured minutes so far (``stages.jsonl``) and the estimate of what remains are added."""
    done = lambda st: out_dir is not None and all((out_dir / "stages" / f"{k}.json").is_file()  # noqa: E731
                                                  for k in st["keys"])
    lines = [f"{s['minutes']:7.1f} min  {s['stage']}{'  [done]' if done(s) else ''}" for s in p["stages"]]
    lines.append(f"{p['total_minutes']:7.1f} min  total (estimate)")
    if out_dir is not None:
        left = sum(s["minutes"] for s in p["stages"] if not done(s))
        lines.append(f"{_stage_minutes(out_dir):7.1f} min  measured so far ({out_dir / 'stages.jsonl'}); about "
                     f"{left:.0f} min of unfinished stages (whole, by the estimate)")
    return "\n".join([*lines, "", "Selection rule: " + p["selection_rule"]])


# ----------------------------------------------------------------------------- report
def _mean_std(vals: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def collect(cfg: StudyConfig, out: Path) -> dict[str, Any]:
    """report.json content from the stage records in ``out/stages`` (whatever has finished)."""
    st = out / "stages"

    def rec(name):
        f = st / f"{name}.json"
        return _read_json(f) if f.is_file() else None

    models = {n: rec(f"eval_{n}") for n in ("full", "retain", "untouched")}
    full_val = rec("val_full")
    full_mu = (models["full"] or {}).get("model_utility")
    for e in models.values():
        if e is not None:
            e["mu_over_full"] = e["model_utility"] / full_mu if full_mu else None
    for n in ("full", "retain"):
        if models[n] is not None and rec(f"finetune_{n}"):
            models[n]["finetune"] = rec(f"finetune_{n}")
    methods: dict[str, Any] = {}
    missing: list[str] = [n for n, e in models.items() if e is None]
    sweeps: dict[str, list[tuple[float, float]]] = {}
    for m in cfg.methods:
        cand = lr_sweep(cfg, m)
        pts = []
        for s in cand:
            r = rec(f"val_{s.name}")
            if r is not None:
                pts.append({**r, "name": s.name, "setting": s.public()})
        if m == "alter" and cfg.alter_variants and full_val and len(pts) == len(cand):
            i, _ = selection(pts, full_val["model_utility"], cfg.mu_floor)
            for s in alter_variants(Setting(**{**pts[i]["setting"], "seed": 0})):
                r = rec(f"val_{s.name}")
                if r is not None:
                    pts.append({**r, "name": s.name, "setting": s.public()})
        for p in pts:
            p["mu_over_full_val"] = (p["model_utility"] / full_val["model_utility"]
                                     if full_val and full_val["model_utility"] else None)
            run = rec(f"run_{p['name']}")
            p["train_wall_s"] = run["wall_s"] if run else None
        entry: dict[str, Any] = {"sweep": [_sweep_row(p) for p in pts], "best": None}
        sweeps[m] = [(p["mu_over_full_val"] or 0.0, p["forget_quality"] or 0.0) for p in pts]
        expected = len(cand) + (len(ALTER_OPEN) if m == "alter" and cfg.alter_variants else 0)
        if pts and full_val and len(pts) == expected:
            i, kept = selection(pts, full_val["model_utility"], cfg.mu_floor)
            best = Setting(**{**pts[i]["setting"], "seed": 0})
            seeds = {seed: rec(f"eval_{best.with_seed(seed).name}") for seed in cfg.seeds}
            done = {k: v for k, v in seeds.items() if v is not None}
            b: dict[str, Any] = {"setting": best.public(), "name": best.name, "kept_utility_floor": kept,
                                 "seeds": sorted(done), "seeds_planned": list(cfg.seeds)}
            for key in ("forget_quality", "model_utility", "forget_rouge", "paraphrase_rouge", "forget_prob",
                        "forget_truth_ratio", "extraction_strength", "exact_memorization", "privleak",
                        "forget_degenerate", "forget_gen_ppl", "retain_degenerate", "retain_gen_ppl"):
                b[f"{key}_mean"], b[f"{key}_std"] = _mean_std([v.get(key) for v in done.values()])
            b["mu_over_full_mean"] = b["model_utility_mean"] / full_mu if full_mu and b["model_utility_mean"] else None
            b["privleak"], b["extraction_strength"] = b["privleak_mean"], b["extraction_strength_mean"]
            b["per_seed"] = {str(k): _seed_row(v) for k, v in done.items()}
            b["examples"] = done[min(done)].get("examples") if done else None
            rl = rec(f"relearn_{m}")
            b["relearn"] = rl["curve"] if rl else None
            b["relearn_base"] = rl["base"] if rl else None
            entry["best"] = b
            if len(done) < len(cfg.seeds) or rl is None:
                missing.append(f"{m} (seeds / relearning)")
        else:
            missing.append(f"{m} (sweep {len(pts)}/{expected})")
        methods[m] = entry
    seeds = sorted({s for e in methods.values() if e["best"] for s in e["best"]["seeds"]})
    data = _read_json(Path(cfg.work_dir) / "data" / "counts.json") if (Path(cfg.work_dir) / "data" / "counts.json").is_file() else {}
    scale = {"forget_rows": len(cfg.forget_authors) * cfg.rows_per_author,
             "retain_rows": len(cfg.retain_authors) * cfg.rows_per_author,
             "eval_rows": {"forget": len(cfg.forget_authors) * cfg.rows_per_author,
                           "retain": len(cfg.retain_authors) * cfg.eval_per_author,
                           "real_authors": cfg.eval_real_rows, "world_facts": cfg.eval_real_rows,
                           "holdout": len(cfg.holdout_authors) * cfg.rows_per_author},
             "validation_rows": {"retain": len(cfg.retain_authors) * cfg.val_per_author,
                                 "real_authors": cfg.val_real_rows, "world_facts": cfg.val_real_rows},
             "seeds": list(cfg.seeds), "seeds_finished": seeds,
             "unlearn_steps": unlearn_steps(cfg),
             "unlearn_batch": f"{cfg.unlearn_batch} forget + {cfg.unlearn_batch} retain",
             "max_new_tokens": cfg.max_new_tokens, "select_new_tokens": cfg.select_new_tokens, "data_counts": data}
    stages = _stage_lines(out)
    minutes = _stage_minutes(out, stages)
    return {"command": None, "written_by": None, "stage_commands": stage_commands(out, stages), "scale": scale,
            **models,
            "full_val": full_val, "methods": methods,
            "goal": goal_verdict(cfg, methods, models, sweeps), "missing": missing, "compute_minutes": minutes,
            "selection_rule": SELECTION_RULE,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SESSION_FIELDS}}


def design_command(command: str) -> str:
    """``command`` without the options of :data:`SESSION_FIELDS` and ``--work-dir``: the command that
    reproduces the whole study, however many sessions and workers ran it. A boolean field is a bare flag;
    the others take a value (``--opt v`` or ``--opt=v``)."""
    bare = {"--" + f.replace("_", "-"): isinstance(getattr(StudyConfig, f), bool)
            for f in (*SESSION_FIELDS, "work_dir")}
    kept, skip = [], False
    for w in command.split():
        opt = w.split("=", 1)[0]
        if skip:
            skip = False
        elif opt in bare:
            skip = not bare[opt] and "=" not in w
        else:
            kept.append(w)
    return " ".join(kept)


def _stage_lines(out: Path) -> list[dict]:
    """``stages.jsonl``: one ``{stage, wall_s, at, command}`` per finished stage (older lines lack some keys)."""
    f = out / "stages.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def stage_commands(out: Path, lines: Sequence[dict] | None = None) -> list[str | None]:
    """The distinct commands that ran the recorded stages, in first-use order; None for stages recorded
    without one (before 2026-12-07)."""
    return list(dict.fromkeys(r.get("command") for r in (_stage_lines(out) if lines is None else lines)))


def _stage_minutes(out: Path, lines: Sequence[dict] | None = None) -> float:
    return sum(r["wall_s"] for r in (_stage_lines(out) if lines is None else lines)) / 60.0


SWEEP_KEYS = ("forget_quality", "model_utility", "mu_over_full_val", "forget_rouge", "forget_prob",
              "forget_truth_ratio", "extraction_strength", "forget_degenerate", "forget_gen_ppl", "retain_degenerate",
              "train_wall_s")


def _sweep_row(p: dict) -> dict:
    return {"name": p["name"], "setting": p["setting"], **{k: p.get(k) for k in SWEEP_KEYS}}


def _seed_row(e: dict) -> dict:
    keys = ("forget_quality", "model_utility", "forget_rouge", "paraphrase_rouge", "forget_prob", "privleak",
            "extraction_strength", "exact_memorization", "forget_degenerate", "forget_gen_ppl", "retain_degenerate")
    return {k: e.get(k) for k in keys}


def goal_verdict(cfg: StudyConfig, methods: dict, models: dict, sweeps: dict) -> dict[str, Any]:
    """The issue's three-part goal from whatever has finished (None = not decidable yet)."""
    a = (methods.get("alter") or {}).get("best")
    out: dict[str, Any] = {"statement": GOAL}
    if a and a["seeds"]:
        fq, mu_rel = a["forget_quality_mean"], a["mu_over_full_mean"]
        out["alter_fq_mu"] = {"met": bool(fq is not None and fq >= 0.05 and mu_rel is not None and mu_rel >= cfg.mu_floor),
                              "forget_quality_mean": fq, "mu_over_full_mean": mu_rel}
    else:
        out["alter_fq_mu"] = {"met": None}
    finished = {m: v for m, v in sweeps.items() if v and methods[m]["best"] is not None}
    # A baseline still running can only lower ALTER's standing: "below one finished baseline" decides the
    # Pareto goal as not met, "above all finished ones" decides nothing until every baseline has its sweep.
    sweep_pending = sorted(m for m in methods if m != "alter" and m not in finished)
    pv = pareto_verdict(finished, cfg.mu_floor)
    if pv["met"] is not False and sweep_pending:
        pv = {**pv, "met": None, "met_so_far": pv["met"], "pending": sweep_pending}
    out["pareto"] = pv
    # The strongest baseline is chosen among all of them, so relearning waits for every baseline's seeds
    # and curve; once none is pending, every baseline's best has both.
    bases = {m: e["best"] for m, e in methods.items() if m != "alter"}
    relearn_pending = sorted(m for m, b in bases.items() if not (
        b and len(b["seeds"]) == len(b["seeds_planned"]) and b.get("relearn")))
    if relearn_pending:
        out["relearn"] = {"met": None, "pending": relearn_pending}
    elif a and a.get("relearn") and bases:
        strongest = max(bases, key=lambda m: ((bases[m]["forget_quality_mean"] or 0.0), bases[m]["model_utility_mean"] or 0.0))
        pa, pb = a["relearn"][-1]["forget_prob"], bases[strongest]["relearn"][-1]["forget_prob"]
        out["relearn"] = {"met": bool(pa < pb), "best_baseline": strongest, "k": a["relearn"][-1]["steps"],
                          "alter_forget_prob": pa, "baseline_forget_prob": pb}
    else:
        out["relearn"] = {"met": None}
    r = models.get("retain")
    if a and a["seeds"] and r:
        deg, ppl, rppl = a["forget_degenerate_mean"], a["forget_gen_ppl_mean"], r.get("forget_gen_ppl")
        out["fluency"] = {"met": bool(deg is not None and deg <= 0.05 and ppl is not None and rppl and ppl <= 2 * rppl),
                          "alter_forget_degenerate": deg, "alter_forget_gen_ppl": ppl, "retain_forget_gen_ppl": rppl,
                          "statement": "issue 19: ALTER's forget answers degenerate <= 5 % and generated ppl <= 2x "
                                       "the retain model's on the same questions"}
    parts = [out[k]["met"] for k in ("alter_fq_mu", "pareto", "relearn")]
    out["met"] = False if False in parts else (None if None in parts else True)
    return out


def write_report(cfg: StudyConfig, out: Path, rep: dict) -> None:
    """report.json, report.md, fq_vs_mu.png and relearn.png into ``out`` (from ``rep`` = :func:`collect`)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "report.json", rep)
    sc = rep["scale"]
    ran = [f"`{c}`" if c else "commands not recorded (see notes.md)" for c in rep.get("stage_commands", [])]
    L = ["# TOFU study on SmolLM2-135M-Instruct (powered design, issue 16)", "",
         f"Command: `{rep['command']}` (reruns skip recorded stages)", "",
         *([f"Stages run by: {'; '.join(ran)}", ""] if ran else []),
         *([f"This report written by: `{rep['written_by']}`", ""]
           if rep.get("written_by") not in (None, rep["command"]) else []),
         "## Scale", "",
         f"- forget: TOFU authors {', '.join(map(str, cfg.forget_authors))} ({sc['forget_rows']} rows, forget01); "
         f"retain: authors {cfg.retain_authors[0]}-{cfg.retain_authors[-1]} ({sc['retain_rows']} rows); membership "
         f"holdout: authors {', '.join(map(str, cfg.holdout_authors))} ({sc['eval_rows']['holdout']} rows, never trained on).",
         f"- full / retain models: SmolLM2-135M-Instruct, every parameter fine-tuned {cfg.ft_epochs} epochs, lr "
         f"{cfg.ft_lr:g}, batch {cfg.ft_batch}, AdamW wd 0.01, warm-up {1 / max(cfg.ft_epochs, 2):.0%}, on 200 / 160 rows.",
         f"- reported evaluation: {sc['eval_rows']['forget']} forget rows, {sc['eval_rows']['retain']} retained-author "
         f"rows (rows 0-{cfg.eval_per_author - 1} of each), {cfg.eval_real_rows} real-author and {cfg.eval_real_rows} "
         f"world-fact rows, greedy answers of {cfg.max_new_tokens} new tokens; validation (selection only): the "
         f"forget rows, retained-author rows {cfg.eval_per_author}-{cfg.eval_per_author + cfg.val_per_author - 1}, real "
         f"authors / world facts rows {cfg.eval_real_rows}-{cfg.eval_real_rows + cfg.val_real_rows - 1}, "
         f"{cfg.select_new_tokens} new tokens.",
         f"- unlearning: {sc['unlearn_steps']} steps ({cfg.unlearn_epochs} epochs) of {sc['unlearn_batch']} rows for "
         f"every method; learning rates {', '.join(f'{x:g}' for x in cfg.lrs_full)} (full-parameter) and "
         f"{', '.join(f'{x:g}' for x in cfg.lrs_lora)} (LoRA B / ALTER experts; ALTER A 1e-5, router 1e-2); "
         f"seeds {', '.join(map(str, cfg.seeds))} for each best setting; float32, CPU.",
         f"- compute so far: {rep['compute_minutes']:.0f} min of stages (`stages.jsonl`).", "",
         "Selection rule (fixed before the runs, `plan.json`): " + SELECTION_RULE, ""]
    L += ["## Models", "", "| model | FQ | MU | MU / full | forget ROUGE | forget Prob. | ES | PrivLeak | forget degenerate "
          "| forget gen. ppl |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in ("untouched", "full", "retain"):
        e = rep.get(n)
        if e is None:
            L.append(f"| {n} | not finished | | | | | | | | |")
            continue
        L.append(f"| {n} | {_fmt(e['forget_quality'])} | {mu_text(e['model_utility'], e['mu_parts'])} | "
                 f"{_fmt(e.get('mu_over_full'))} | {_fmt(e['forget_rouge'])} | {_fmt(e['forget_prob'])} | "
                 f"{_fmt(e['extraction_strength'])} | {_fmt(e['privleak'], 1)} | {_fmt(e.get('forget_degenerate'))} | "
                 f"{_fmt(e.get('forget_gen_ppl'), 1)} |")
    L += ["", "## Best settings (reported rows, mean ± std over seeds)", "",
          "| method | setting | seeds | FQ | MU / full | forget ROUGE | paraphrase ROUGE | ES | PrivLeak | forget degenerate "
          "| forget gen. ppl | retain degenerate |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pm = lambda b, k, p=3: (f"{_fmt(b[k + '_mean'], p)} ± {_fmt(b[k + '_std'], p)}"  # noqa: E731
                            if b.get(k + "_mean") is not None else "—")
    for m, e in rep["methods"].items():
        b = e["best"]
        if not b or not b["seeds"]:
            L.append(f"| {m} | {'not finished' if not b else b['name']} | | | | | | | | | | |")
            continue
        mu_rel = (f"{_fmt(b['mu_over_full_mean'])} ± {_fmt(b['model_utility_std'] / rep['full']['model_utility'])}"
                  if b["mu_over_full_mean"] is not None and rep.get("full") else "—")
        L.append(f"| {m} | `{b['name']}`{'' if b['kept_utility_floor'] else ' (below floor)'} | {len(b['seeds'])} | "
                 f"{pm(b, 'forget_quality')} | {mu_rel} | {pm(b, 'forget_rouge')} | {pm(b, 'paraphrase_rouge')} | "
                 f"{pm(b, 'extraction_strength')} | {pm(b, 'privleak', 1)} | {pm(b, 'forget_degenerate')} | "
                 f"{pm(b, 'forget_gen_ppl', 1)} | {pm(b, 'retain_degenerate')} |")
    L += ["", "degenerate = share of greedy answers that are empty, letterless, or one token / character run covering more "
          "than half of the answer; gen. ppl = mean perplexity of the greedy answer under the untouched SmolLM2 "
          "(docs/eval_definitions.md); ES = Extraction Strength on the forget rows; PrivLeak = Min-K% AUC against the "
          "holdout authors, relative to the retain model's (percent).", "",
          "## Sweep (validation rows; seed 0)", "",
          "| method | run | FQ | val MU | val MU / full | forget ROUGE | forget Prob. | ES | forget degenerate | forget gen. ppl "
          "| train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, e in rep["methods"].items():
        best = (e["best"] or {}).get("name")
        for p in e["sweep"]:
            star = " **(best)**" if p["name"] == best else ""
            L.append(f"| {m} | `{p['name']}`{star} | {_fmt(p['forget_quality'])} | {_fmt(p['model_utility'])} | "
                     f"{_fmt(p['mu_over_full_val'])} | {_fmt(p['forget_rouge'])} | {_fmt(p['forget_prob'])} | "
                     f"{_fmt(p['extraction_strength'])} | {_fmt(p['forget_degenerate'])} | {_fmt(p['forget_gen_ppl'], 1)} "
                     f"| {_fmt(p['train_wall_s'], 0)} |")
    L += ["", "## Relearning attack (every parameter fine-tuned on half the forget rows; the other half scored)", "",
          "| method | " + " | ".join(f"k={k}" for k in cfg.relearn_steps) + " | before unlearning |",
          "|---|" + "---|" * (len(cfg.relearn_steps) + 1)]
    for m, e in rep["methods"].items():
        b = e["best"]
        if b and b.get("relearn"):
            cells = " | ".join(f"{c['forget_prob']:.3f} / {c['forget_rouge']:.3f}" for c in b["relearn"])
            base = b.get("relearn_base") or {}
            L.append(f"| {m} | {cells} | {_fmt(base.get('prob'))} / {_fmt(base.get('rouge_l_recall'))} |")
    L += ["", "Cells: forget Prob. / forget ROUGE-L on the held-out half after k attack steps.", "",
          "## Goal", "", GOAL, ""]
    g = rep["goal"]
    verdict = lambda v: {True: "met", False: "NOT met", None: "not decided (stages missing)"}[v]  # noqa: E731
    a = g["alter_fq_mu"]
    L.append(f"- FQ ≥ 0.05 with MU ≥ {cfg.mu_floor:.0%} of full: {verdict(a['met'])}"
             + (f" (FQ {_fmt(a['forget_quality_mean'])}, MU/full {_fmt(a['mu_over_full_mean'])})" if a["met"] is not None else ""))
    pv = g["pareto"]
    below = {m: v["alter_below_at_mu"] for m, v in (pv.get("per_baseline") or {}).items() if v["alter_below_at_mu"]}
    pending = lambda v: (f"; waiting for {', '.join(v['pending'])}" if v.get("pending") else "")  # noqa: E731
    L.append(f"- Pareto frontier above every baseline at MU ≥ {cfg.mu_floor:.0%} of full: {verdict(pv['met'])}"
             + (f"; ALTER below: " + ", ".join(f"{m} at MU/full {', '.join(dict.fromkeys(f'{u:.3f}' for u in us))}" for m, us in below.items())
                if below else "")
             + (f" (above the finished baselines {', '.join(pv['per_baseline'])} so far)" if pv.get("met_so_far") else "")
             + pending(pv))
    r = g["relearn"]
    L.append(f"- recovers less than the best baseline under relearning: {verdict(r['met'])}"
             + (f" (best baseline {r['best_baseline']}; forget Prob. at k={r['k']}: ALTER {r['alter_forget_prob']:.3f}"
                f" vs {r['baseline_forget_prob']:.3f})" if r.get("met") is not None else "") + pending(r))
    if "fluency" in g:
        f = g["fluency"]
        L.append(f"- fluency (issue 19): {verdict(f['met'])} (forget degenerate {_fmt(f['alter_forget_degenerate'])}, "
                 f"forget gen. ppl {_fmt(f['alter_forget_gen_ppl'], 1)} vs retain model {_fmt(f['retain_forget_gen_ppl'], 1)})")
    L.append(f"- overall: {verdict(g['met'])}")
    if rep["missing"]:
        L += ["", "Stages not finished: " + ", ".join(rep["missing"])]
    L += ["", "![forget quality vs model utility](fq_vs_mu.png)", "", "![relearning](relearn.png)", ""]
    L += _examples(rep)
    notes = out / "notes.md"  # hand-written reading of the results, kept across report rewrites
    if notes.is_file():
        L += ["## Notes", "", notes.read_text().strip(), ""]
    (out / "report.md").write_text("\n".join(L))
    _plot_sweep(rep, cfg, out / "fq_vs_mu.png")
    _plot_relearn(rep, out / "relearn.png")


def _examples(rep: dict) -> list[str]:
    from alter_jax.study.fluency import _short

    L = ["## Example answers (best setting, seed 0; reported rows)", ""]
    any_ = False
    for m, e in rep["methods"].items():
        ex = (e["best"] or {}).get("examples")
        if not ex:
            continue
        any_ = True
        L += [f"**{m}** (`{e['best']['name']}`)", "", "| split | generated | ground truth |", "|---|---|---|"]
        for split in ("forget", "retain"):
            for row in ex.get(split, []):
                L.append(f"| {split} | {_short(row[1]) or '(empty)'} | {_short(row[2])} |")
        L.append("")
    return L if any_ else []


def _plot_sweep(rep: dict, cfg: StudyConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alter_jax.study.plotting import place_labels

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)  # measured label boxes = saved pixels
    ax.set_yscale("log")
    labels = []
    for i, (m, e) in enumerate(rep["methods"].items()):
        pts = [(p["mu_over_full_val"], max(p["forget_quality"] or 0.0, 1e-6), p["name"]) for p in e["sweep"]
               if p["mu_over_full_val"] is not None]
        if not pts:
            continue
        c = f"C{i % 10}"
        star = m == "alter"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, marker="*" if star else "o", s=90 if star else 30,
                   label=m, zorder=3)
        fr = pareto_frontier([(p[0], p[1]) for p in pts])
        if fr:  # the frontier as a staircase: the best FQ reachable at utility >= x
            xs, ys = [], []
            for mu, fq in fr:
                if xs:
                    xs.append(mu)
                    ys.append(ys[-1])
                xs.append(mu)
                ys.append(fq)
            ax.plot(xs, ys, color=c, linewidth=2.2 if star else 1.0, alpha=0.8)
        best = (e["best"] or {}).get("name")
        labels += [(p[0], p[1], p[2]) for p in pts if p[2] == best]
    ax.axvline(cfg.mu_floor, color="grey", linestyle=":", linewidth=0.9)
    ax.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("validation Model Utility / full model's")
    ax.set_ylabel("Forget Quality (KS p-value, log)")
    ax.set_title("TOFU forget01 (40 rows), SmolLM2-135M-Instruct: every sweep point, Pareto frontier per method")
    ax.title.set_fontsize(9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    place_labels(ax, labels)  # after the layout: the boxes are measured where they will be drawn
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_relearn(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for i, (m, e) in enumerate(rep["methods"].items()):
        curve = (e["best"] or {}).get("relearn")
        if not curve:
            continue
        ks = [c["steps"] for c in curve]
        for ax, key in zip(axes, ("forget_prob", "forget_rouge")):
            ax.plot(ks, [c[key] for c in curve], marker="*" if m == "alter" else "o", color=f"C{i % 10}", label=m,
                    linewidth=2.2 if m == "alter" else 1.0)
    for ax, lab in zip(axes, ("forget Prob. (held-out half)", "forget ROUGE-L (held-out half)")):
        ax.set_xlabel("relearning steps k")
        ax.set_ylabel(lab)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # outside the axes: nine curves leave no empty corner
        fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle("Relearning attack on each method's best setting", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The ``tofu-smollm2`` options (shared by ``bin/study tofu-smollm2`` and ``python -m``)."""
    p.add_argument("--quick", action="store_true", help="tiny scale (2 rows per author, alter + ga; tests)")
    p.add_argument("--plan", action="store_true", help="print the stages and their estimated minutes, run nothing")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop before a stage that would start after this many minutes (rerun to continue)")
    p.add_argument("--work-dir", default=None, help="big stage outputs (default: runs/study_smollm2[_quick])")
    p.add_argument("--out", default=None, help="report and stage records (default: studies/tofu_smollm2)")
    p.add_argument("--tofu-dir", default=StudyConfig.tofu_dir, help="TOFU folder (default: %(default)s)")
    p.add_argument("--methods", default=None, help=f"comma list (default: {','.join(METHODS)})")
    p.add_argument("--keep-runs", action="store_true", help="keep every run folder (default: deleted per method)")
    p.add_argument("--only", default=None,
                   help="comma list: run only these of the design's methods (a second worker; plan and report "
                        "keep every method)")
    p.add_argument("--models-from", default=None, metavar="WORK_DIR",
                   help="read the fine-tuned models and data subset from another worker's --work-dir (waits "
                        "for them) instead of building them here")


def config_from_args(args) -> StudyConfig:
    kw: dict[str, Any] = {"tofu_dir": args.tofu_dir, "max_minutes": args.max_minutes, "keep_runs": args.keep_runs}
    if args.work_dir:
        kw["work_dir"] = args.work_dir
    if args.out:
        kw["out_dir"] = args.out
    if args.methods:
        from alter_jax.train.methods import METHODS as KNOWN

        kw["methods"] = _method_list("--methods", args.methods, KNOWN, "unknown")
    if args.models_from:
        if args.work_dir is None or Path(args.work_dir).resolve() == Path(args.models_from).resolve():
            raise SystemExit("--models-from: give this worker its own --work-dir (its run folders must not "
                             "mix with the first worker's)")
        kw["models_from"] = args.models_from
    if not Path(args.tofu_dir).is_dir():
        raise SystemExit(f"--tofu-dir {args.tofu_dir}: not a folder; pass the TOFU data folder (../shared/data/tofu)")
    cfg = quick_config(**kw) if args.quick else StudyConfig(**kw)
    if args.only:
        cfg = dataclasses.replace(cfg, only=_method_list("--only", args.only, cfg.methods,
                                                         "not in the study's methods"))
    return cfg


def _method_list(flag: str, text: str, allowed: Sequence[str], why: str) -> tuple[str, ...]:
    """A comma list of method names, each checked against ``allowed`` (a clear exit naming the flag)."""
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in allowed]
    if bad:
        raise SystemExit(f"{flag}: {', '.join(bad)} {why}; choose from {', '.join(allowed)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="study tofu-smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.plan:
        print(plan_text(plan(cfg), Path(cfg.out_dir)))
        return 0
    Study(cfg, command=" ".join(["bin/study", "tofu-smollm2", *argv])).run()
    return 0


if __name__ == "__main__":
    import torch  # noqa: F401  (torch before jax, as bin/study: jax first can stall PyTorch's OpenMP workers)

    raise SystemExit(main())
