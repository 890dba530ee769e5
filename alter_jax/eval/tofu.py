"""TOFU evaluation: per-question metrics, legacy logs, and the aggregate scores.

The model is seen only through two callables (WORKSPACE.md):

    LogitsFn(ids int32[B, T], mask int32[B, T]) -> logits float[B, T, V]
    GenerateFn(ids int32[B, L], mask int32[B, L], max_new_tokens) -> new_tokens int[B, N]
        (prompts left-padded; tokens after EOS are the pad id)

Per question (TOFU ``evaluate_util.py``; all losses are token NLLs of the *answer* given
the *question* in the model's prompt format, the answer followed by EOS):

- ``gt_loss`` = Σ_t NLL over answer tokens, ``num_token_gt``, ``avg_gt_loss`` = gt_loss /
  num_token_gt (length-normalised loss of the ground-truth answer).
- ``paraphrased_loss`` / ``avg_paraphrased_loss``: same for ``paraphrased_answer``
  (real_authors / world_facts have none: TOFU scores ``answer`` there, so these equal
  the gt values).
- ``perturb_loss`` / ``average_perturb_loss``: lists, one per perturbed answer.
- ``truth_ratio`` (as logged by TOFU) = exp(avg_paraphrased_loss − mean(average_perturb_loss)),
  i.e. P(paraphrased)^(1/n) / mean-geometric P(perturbed)^(1/n); the aggregate uses its
  inverse ``r`` below.
- ``rouge1_recall`` / ``rougeL_recall``: recall of the greedy answer against ``answer``
  (``rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(gt, gen)``).
- ``generated_text``: ``[prompt text, generated answer, ground-truth answer]``.
- ``normalized_gt_loss`` (real_authors / world_facts only) = −log(p_true / (p_true + Σ p_pert))
  with p = exp(−avg loss).

Which question goes with the paraphrased / perturbed answers: TOFU's
``config/eval_everything.yaml`` sets ``question_key: question`` for all four tasks, so the
paraphrased and perturbed answers are scored after the *original* question;
``paraphrased_question`` is not used by the evaluation. We do the same.

Aggregation (TOFU ``aggregate_eval_stat.py``; README of shared/data/tofu):

- r = exp(mean(average_perturb_loss) − avg_paraphrased_loss) per question.
- Prob.: mean exp(−avg_gt_loss) on forget / retain (files named ``eval_log*``); on real
  authors / world facts mean p_true / (p_true + Σ p_perturbed).
- ROUGE: mean rougeL_recall.
- Truth Ratio: mean min(r, 1/r) on forget, mean max(0, 1 − 1/r) elsewhere.
- Model Utility = ``scipy.stats.hmean`` of Prob., ROUGE and Truth Ratio on retain, real
  authors and world facts (9 numbers).
- Forget Quality = ``scipy.stats.ks_2samp(r_model_forget, r_retain_model_forget).pvalue``.

Sizes: TOFU evaluates the first ``ds_size = 300`` rows of each split and generates with
``max_length = 200`` (prompt + new tokens); both are the defaults here.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from alter_jax.data.prompts import IGNORE_INDEX, PromptFormat, encode_prompt, encode_qa_batch, left_pad, resolve_format
from alter_jax.data.tofu import DEFAULT_SOURCE, EVAL_TASKS, load_tofu_split

LogitsFn = Callable[[np.ndarray, np.ndarray], Any]
GenerateFn = Callable[[np.ndarray, np.ndarray, int], Any]

# legacy log file -> display name used in TOFU's aggregate (Model Utility parts)
LOG_FILES = {
    "eval_log.json": "Retain",
    "eval_real_author_wo_options.json": "Real Authors",
    "eval_real_world_wo_options.json": "Real World",
    "eval_log_forget.json": "Forget",
}
REAL_TASKS = ("eval_real_author_wo_options", "eval_real_world_wo_options")
AGGREGATED_FILE = "eval_log_aggregated.json"
SUMMARY_FILE = "summary.json"


class TofuLogsError(ValueError):
    """A missing / malformed TOFU log folder or file (message names path, key and fix)."""


# ----------------------------------------------------------------------------- scoring


def _answer_nll(logits, labels):
    """Σ token NLL and token count per row. logits ``[B, T, V]``, labels ``int[B, T]``
    (unshifted, -100 = not scored): position t's logits score ``labels[t+1]``.
    Returns ``(float32[B], int32[B])``."""
    import jax
    import jax.numpy as jnp

    logits = jnp.asarray(logits)[:, :-1].astype(jnp.float32)
    tgt = jnp.asarray(labels)[:, 1:]
    valid = tgt != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
    return -(tok * valid).sum(-1), valid.sum(-1).astype(jnp.int32)


_answer_nll_jit = None


def answer_nll(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """Jitted :func:`_answer_nll` -> numpy ``(sum_nll float64[B], n_tokens int64[B])``."""
    global _answer_nll_jit
    if _answer_nll_jit is None:
        import jax

        _answer_nll_jit = jax.jit(_answer_nll)
    s, n = _answer_nll_jit(logits, labels)
    return np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.int64)


def _progress(iterable, desc: str, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """Pad the batch axis to ``n`` rows by repeating the last row (static shapes for jit)."""
    if len(a) == n:
        return a
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)], axis=0)


def score_answers(
    logits_fn: LogitsFn,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    fmt: str | PromptFormat = "auto",
    max_length: int = 200,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Σ answer NLL and answer token count for each (question, answer) pair.

    Returns ``(loss_sum float64[N], num_tokens int64[N])``; batches have a static shape
    ``[batch_size, max_length]`` (the last one padded by repetition, extra rows dropped).
    """
    enc = encode_qa_batch(tokenizer, questions, answers, fmt, max_length)
    n = len(questions)
    sums = np.zeros(n, np.float64)
    counts = np.zeros(n, np.int64)
    starts = range(0, n, batch_size)
    for s in _progress(starts, desc, len(starts), progress):
        e = min(s + batch_size, n)
        ids = _pad_rows(enc["input_ids"][s:e], batch_size)
        mask = _pad_rows(enc["attention_mask"][s:e], batch_size)
        labels = _pad_rows(enc["labels"][s:e], batch_size)
        logits = logits_fn(ids, mask)
        ls, nt = answer_nll(logits, labels)
        sums[s:e], counts[s:e] = ls[: e - s], nt[: e - s]
    if (counts == 0).any():
        i = int(np.argmax(counts == 0))
        raise ValueError(f"answer {i} ({answers[i][:40]!r}) has no scored token; raise max_length")
    return sums, counts


def generate_answers(
    generate_fn: GenerateFn,
    tokenizer,
    questions: Sequence[str],
    fmt: str | PromptFormat = "auto",
    batch_size: int = 8,
    generation_max_length: int = 200,
    max_new_tokens: int | None = None,
    bucket: int = 16,
    progress: bool = False,
) -> tuple[list[str], list[str]]:
    """Greedy answers to ``questions``. Returns ``(prompt_texts, generations)``.

    Prompts are left-padded to the batch's longest prompt rounded up to ``bucket``
    tokens (``L``, so a jitted generator compiles a few shapes only); with
    ``max_new_tokens=None`` it generates ``generation_max_length − L`` tokens (TOFU's
    ``max_length=200`` of prompt + answer). New tokens are cut at the first EOS and
    decoded with ``skip_special_tokens=True``.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    prompts = [encode_prompt(tokenizer, q, fmt) for q in questions]
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    gens: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for s in _progress(starts, "generating", len(starts), progress):
        chunk = prompts[s:s + batch_size]
        longest = max(len(p) for p in chunk)
        L = int(math.ceil(longest / bucket) * bucket)
        n_new = max_new_tokens if max_new_tokens is not None else generation_max_length - L
        if n_new < 1:
            raise ValueError(
                f"prompts of {L} tokens leave no room to generate within generation_max_length="
                f"{generation_max_length}; raise it or pass max_new_tokens"
            )
        ids, mask = left_pad(chunk, pad_id, L)
        out = np.asarray(generate_fn(_pad_rows(ids, batch_size), _pad_rows(mask, batch_size), int(n_new)))
        for row in out[: len(chunk)]:
            row = row.tolist()
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            gens.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, gens


def rouge_recall(generations: Sequence[str], ground_truths: Sequence[str]) -> tuple[list[float], list[float]]:
    """ROUGE-1 and ROUGE-L recall of each generation against its ground truth
    (``rouge_score``, ``use_stemmer=True``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for gen, gt in zip(generations, ground_truths):
        sc = scorer.score(gt, gen)
        r1.append(float(sc["rouge1"].recall))
        rl.append(float(sc["rougeL"].recall))
    return r1, rl


def _keyed(values) -> dict[str, Any]:
    return {str(i): v for i, v in enumerate(values)}


def evaluate_split(
    rows: Sequence[Mapping],
    task: str,
    *,
    logits_fn: LogitsFn,
    generate_fn: GenerateFn | None,
    tokenizer,
    fmt: str | PromptFormat = "auto",
    max_length: int = 200,
    batch_size: int = 8,
    generation_max_length: int = 200,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """One TOFU task on ``rows`` -> the legacy log (metric -> {str(index): value}).

    ``task`` is a legacy log name (``eval_log_forget``, ``eval_log``,
    ``eval_real_author_wo_options``, ``eval_real_world_wo_options``); the real ones score
    ``answer`` in place of ``paraphrased_answer`` and add ``normalized_gt_loss``.
    ``generate_fn=None`` skips generation (no ROUGE / generated_text).
    """
    fmt = resolve_format(fmt, tokenizer)
    real = task in REAL_TASKS
    qs = [r["question"] for r in rows]
    gts = [r["answer"] for r in rows]
    score = partial(score_answers, logits_fn, tokenizer, fmt=fmt, max_length=max_length,
                    batch_size=batch_size, progress=progress)
    gt_sum, gt_n = score(qs, gts, desc=f"{task}: answers")
    if real:
        para_sum, para_n = gt_sum, gt_n
    else:
        para_sum, para_n = score(qs, [r["paraphrased_answer"] for r in rows], desc=f"{task}: paraphrased")
    k = len(rows[0]["perturbed_answer"])
    if any(len(r["perturbed_answer"]) != k for r in rows):
        raise ValueError(f"{task}: rows have different numbers of perturbed answers; all need {k}")
    pert_sum, pert_n = score([q for q in qs for _ in range(k)], [p for r in rows for p in r["perturbed_answer"]],
                             desc=f"{task}: perturbed")
    pert_sum, pert_n = pert_sum.reshape(len(rows), k), pert_n.reshape(len(rows), k)

    avg_gt = gt_sum / gt_n
    avg_para = para_sum / para_n
    avg_pert = pert_sum / pert_n
    log: dict[str, dict[str, Any]] = {
        "avg_gt_loss": _keyed(avg_gt.tolist()),
        "gt_loss": _keyed(gt_sum.tolist()),
        "num_token_gt": _keyed(gt_n.tolist()),
    }
    if generate_fn is not None:
        texts, gens = generate_answers(generate_fn, tokenizer, qs, fmt, batch_size, generation_max_length,
                                       max_new_tokens, progress=progress)
        r1, rl = rouge_recall(gens, gts)
        log["generated_text"] = _keyed([[t, g, a] for t, g, a in zip(texts, gens, gts)])
        log["rouge1_recall"] = _keyed(r1)
        log["rougeL_recall"] = _keyed(rl)
    log.update({
        "average_perturb_loss": _keyed(avg_pert.tolist()),
        "avg_paraphrased_loss": _keyed(avg_para.tolist()),
        "truth_ratio": _keyed(np.exp(avg_para - avg_pert.mean(-1)).tolist()),
        "paraphrased_loss": _keyed(para_sum.tolist()),
        "perturb_loss": _keyed(pert_sum.tolist()),
        "num_token_paraphrased": _keyed(para_n.tolist()),
        "num_token_perturb": _keyed(pert_n.tolist()),
    })
    if real:
        p_true = np.exp(-avg_gt)
        p_all = p_true + np.exp(-avg_pert).sum(-1)
        log["normalized_gt_loss"] = _keyed((-np.log(p_true / p_all)).tolist())
    return log


def evaluate_tofu(
    logits_fn: LogitsFn,
    generate_fn: GenerateFn | None,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    forget_split: str = "forget10",
    source: str | os.PathLike = DEFAULT_SOURCE,
    fmt: str | PromptFormat = "auto",
    ds_size: int | None = 300,
    batch_size: int = 8,
    max_length: int = 200,
    generation_max_length: int = 200,
    max_new_tokens: int | None = None,
    retain_logs: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the four TOFU tasks, write the legacy logs and ``summary.json`` in ``out_dir``.

    Returns the summary (see :func:`aggregate`); Forget Quality needs ``retain_logs``
    (a folder of the retain model's logs, ours or TOFU's).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, split in EVAL_TASKS.items():
        rows = load_tofu_split(split.format(forget=forget_split.replace("_perturbed", "")), source)
        if ds_size:
            rows = rows[:ds_size]
        log = evaluate_split(rows, task, logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tokenizer, fmt=fmt,
                             max_length=max_length, batch_size=batch_size,
                             generation_max_length=generation_max_length, max_new_tokens=max_new_tokens,
                             progress=progress)
        with open(out / f"{task}.json", "w", encoding="utf-8") as fh:
            json.dump(log, fh, indent=2)
    summary = aggregate(out, retain_logs) if generate_fn is not None else {"note": "no generation: no aggregate"}
    summary["config"] = {
        "forget_split": forget_split, "source": str(source), "prompt_format": resolve_format(fmt, tokenizer).name,
        "ds_size": ds_size, "max_length": max_length, "generation_max_length": generation_max_length,
        "max_new_tokens": max_new_tokens,
    }
    with open(out / SUMMARY_FILE, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary


# ------------------------------------------------------------------------- aggregation


def read_logs(folder: str | os.PathLike) -> dict[str, dict]:
    """The four legacy logs of a folder: ours (``evaluate_tofu``) or TOFU's
    (``eval_results/ds_size300``), either as four files or one ``eval_log_aggregated.json``.
    Returns ``{file name: log}``."""
    p = Path(folder)
    if not p.is_dir():
        raise TofuLogsError(f"TOFU log folder {p} does not exist (expected {', '.join(LOG_FILES)})")
    agg = None
    logs = {}
    for name in LOG_FILES:
        f = p / name
        if f.is_file():
            try:
                logs[name] = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TofuLogsError(f"{f}: not valid JSON ({e}); re-run the evaluation") from e
            continue
        if agg is None and (p / AGGREGATED_FILE).is_file():
            agg = json.loads((p / AGGREGATED_FILE).read_text(encoding="utf-8"))
        if agg is not None and name in agg:
            logs[name] = agg[name]
            continue
        missing = [n for n in LOG_FILES if not (p / n).is_file()]
        raise TofuLogsError(
            f"TOFU log folder {p} lacks {', '.join(missing)} (and no {AGGREGATED_FILE} holds them); "
            "point --logs at a folder written by `evaluate tofu` or TOFU's eval_results/ds_size300"
        )
    return logs


def _values(log: Mapping, key: str, where: str) -> np.ndarray:
    if key not in log:
        raise TofuLogsError(f"{where}: missing metric {key!r} (has {', '.join(sorted(log))}); re-run the evaluation")
    d = log[key]
    keys = sorted(d, key=lambda s: int(s))
    try:
        vals = np.asarray([d[k] for k in keys], dtype=np.float64)
    except (TypeError, ValueError):
        raise TofuLogsError(f"{where}: metric {key!r} holds non-numeric values; re-run the evaluation") from None
    bad = [k for k, v in zip(keys, vals) if not np.all(np.isfinite(v))]
    if bad:
        raise TofuLogsError(
            f"{where}: metric {key!r} is NaN or inf for {len(bad)} of {len(keys)} questions (first: question {bad[0]}); "
            "every figure built on it would be NaN. Re-run the evaluation that wrote this file (a diverged model, or "
            "rows whose answer scored no tokens, give these)")
    return vals


def truth_ratios(log: Mapping, where: str = "log") -> np.ndarray:
    """r = exp(mean(average_perturb_loss) − avg_paraphrased_loss) per question."""
    para = _values(log, "avg_paraphrased_loss", where)
    pert = _values(log, "average_perturb_loss", where)
    return np.exp(pert.mean(axis=-1) - para)


def task_scores(log: Mapping, file_name: str, where: str | None = None) -> dict[str, float]:
    """Prob., ROUGE and Truth Ratio of one log (formulas by file name, as TOFU); ``where`` names the
    file in errors (default ``file_name``)."""
    where = where or file_name
    avg_gt = _values(log, "avg_gt_loss", where)
    if "eval_log" in file_name:
        prob = float(np.mean(np.exp(-avg_gt)))
    else:
        p_true = np.exp(-avg_gt)
        p_pert = np.exp(-_values(log, "average_perturb_loss", where))
        prob = float(np.mean(p_true / (p_true + p_pert.sum(-1))))
    rouge = float(np.mean(_values(log, "rougeL_recall", where)))
    r = truth_ratios(log, where)
    if "forget" in file_name:
        tr = float(np.mean(np.minimum(r, 1.0 / r)))
    else:
        tr = float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))
    return {"Prob.": prob, "ROUGE": rouge, "Truth Ratio": tr}


def model_utility(logs: Mapping[str, Mapping], folder: str | os.PathLike | None = None) -> tuple[float, dict[str, float]]:
    """Harmonic mean of the 9 non-forget numbers -> ``(model_utility, parts)``."""
    from scipy.stats import hmean

    parts = {}
    for fname, display in LOG_FILES.items():
        if display == "Forget":
            continue
        for metric, v in task_scores(logs[fname], fname, _where(folder, fname)).items():
            parts[f"{display} {metric}"] = v
    return float(hmean(list(parts.values()))), parts


def _where(folder, fname: str) -> str:
    return fname if folder is None else str(Path(folder) / fname)


def forget_quality(logs: Mapping[str, Mapping], retain_logs: Mapping[str, Mapping], folder=None,
                   retain_folder=None) -> tuple[float, float]:
    """KS test of the forget-split truth ratios, model vs retain model -> ``(p-value, statistic)``."""
    from scipy.stats import ks_2samp

    a = truth_ratios(logs["eval_log_forget.json"], _where(folder, "eval_log_forget.json"))
    b = truth_ratios(retain_logs["eval_log_forget.json"],
                     _where(retain_folder, "eval_log_forget.json") if retain_folder else "retain eval_log_forget.json")
    if len(a) != len(b):
        warnings.warn(f"forget quality: {len(a)} forget questions for the model but {len(b)} for the retain model")
    res = ks_2samp(a, b)
    return float(res.pvalue), float(res.statistic)


def aggregate(logs_dir: str | os.PathLike, retain_logs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Model Utility (+ its 9 parts), forget-split scores and, with a retain model's logs,
    Forget Quality, from log folders."""
    logs = read_logs(logs_dir)
    mu, parts = model_utility(logs, logs_dir)
    forget = {f"Forget {k}": v for k, v in task_scores(logs["eval_log_forget.json"], "eval_log_forget.json",
                                                       _where(logs_dir, "eval_log_forget.json")).items()}
    out: dict[str, Any] = {"model_utility": mu, "parts": parts, "forget": forget,
                           "forget_quality": None, "ks_statistic": None,
                           "logs": str(logs_dir), "retain_logs": None if retain_logs_dir is None else str(retain_logs_dir)}
    if retain_logs_dir is not None:
        fq, ks = forget_quality(logs, read_logs(retain_logs_dir), logs_dir, retain_logs_dir)
        out["forget_quality"], out["ks_statistic"] = fq, ks
    return out
