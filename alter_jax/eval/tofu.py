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
``paraphrased_question`` is not used by TOFU's evaluation. We do the same by default; the
paraphrased-question mode (open-unlearning's ``question_key: paraphrased_question``) adds
forget / retain tasks ``*_paraphrased_question`` that ask it instead.

Aggregation (TOFU ``aggregate_eval_stat.py``; README of shared/data/tofu):

- r = exp(mean(average_perturb_loss) − avg_paraphrased_loss) per question.
- Prob.: mean exp(−avg_gt_loss) on forget / retain (files named ``eval_log*``); on real
  authors / world facts mean p_true / (p_true + Σ p_perturbed).
- ROUGE: mean rougeL_recall.
- Truth Ratio: mean min(r, 1/r) on forget, mean max(0, 1 − 1/r) elsewhere.
- Model Utility = ``scipy.stats.hmean`` of Prob., ROUGE and Truth Ratio on retain, real
  authors and world facts (9 numbers).
- Forget Quality = ``scipy.stats.ks_2samp(r_model_forget, r_retain_model_forget).pvalue``.

Sizes and generation (open-unlearning's choices, the defaults here): every row of each
split is scored (``ds_size=None``; TOFU's original code scores the first 300) and greedy
answers get ``max_new_tokens = 200`` *new* tokens (TOFU's original ``max_length = 200``
counts the prompt too: pass ``generation_max_length=200`` for it).

Added metrics (open-unlearning's definitions; docs/eval_definitions.md):

- per split: ``exact_memorization`` / ``extraction_strength`` of the ground-truth answer
  (:mod:`alter_jax.eval.memorization`), ``truth_ratio_prob_mean`` = mean p_c / (p_c + p_w + 1e-10)
  with p_c = exp(−avg_paraphrased_loss), p_w = exp(−mean average_perturb_loss);
- membership inference (:mod:`alter_jax.eval.mia`) on forget vs holdout rows (question +
  answer in the prompt format), PrivLeak on Min-K%;
- ``aggregate`` = harmonic mean of Forget Quality and Model Utility (open-unlearning reports
  no single score; this one is ours, named ``aggregate``).

Logs are written both as TOFU's legacy files and as open-unlearning's ``TOFU_EVAL.json`` /
``TOFU_SUMMARY.json``; either can be read back (:func:`read_logs`), e.g. as retain logs.
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

from alter_jax.data.prompts import (IGNORE_INDEX, PromptFormat, encode_prompt, encode_qa_batch, left_pad,
                                    resolve_format, with_system_prompt)
from alter_jax.data.tofu import DEFAULT_SOURCE, EVAL_TASKS, TofuDataError, author_blocks, load_tofu_split
from alter_jax.eval import mia as M
from alter_jax.eval.memorization import TokenStats, pad_rows, mean_defined, memorization_scores, token_stats

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
OU_EVAL_FILE = "TOFU_EVAL.json"  # open-unlearning's per-index logs
OU_SUMMARY_FILE = "TOFU_SUMMARY.json"
DEFAULT_MAX_NEW_TOKENS = 200
# legacy task -> split name in our outputs; open-unlearning's metric prefix
SPLIT_NAMES = {
    "eval_log_forget": "forget",
    "eval_log": "retain",
    "eval_real_author_wo_options": "real_authors",
    "eval_real_world_wo_options": "world_facts",
}
OU_PREFIX = {"eval_log_forget": "forget", "eval_log": "retain",
             "eval_real_author_wo_options": "ra", "eval_real_world_wo_options": "wf"}
OU_TR_KEY = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio", "ra": "ra_Truth_Ratio",
             "wf": "wf_Truth_Ratio"}
PQ_SUFFIX = "_paraphrased_question"  # paraphrased-question mode: extra tasks for forget and retain
PER_SPLIT_METRICS = ("prob", "rouge_l_recall", "truth_ratio", "truth_ratio_prob_mean", "exact_memorization",
                     "extraction_strength", "degenerate_rate", "rep_4", "distinct_1", "distinct_2", "generated_ppl",
                     "generated_ppl_median")


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
    length_bucket: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ answer NLL and answer token count for each (question, answer) pair.

    Returns ``(loss_sum float64[N], num_tokens int64[N])``. Rows are scored longest first in batches of
    ``batch_size`` (the last one padded by repetition, extra rows dropped), each right-padded batch cut
    to its longest row rounded up to ``length_bucket`` (a few static shapes; 0 = always ``max_length``):
    causal attention makes a row's scores independent of the padding after it.
    """
    from alter_jax.data.batching import sorted_row_batches

    enc = encode_qa_batch(tokenizer, questions, answers, fmt, max_length)
    n = len(questions)
    sums = np.zeros(n, np.float64)
    counts = np.zeros(n, np.int64)
    batches = sorted_row_batches(enc["attention_mask"].sum(axis=1), batch_size, length_bucket, max_length)
    for rows, w in _progress(batches, desc, -(-n // batch_size), progress):
        ids, mask, labels = (pad_rows(enc[k][rows, :w], batch_size) for k in ("input_ids", "attention_mask", "labels"))
        logits = logits_fn(ids, mask)
        ls, nt = answer_nll(logits, labels)
        sums[rows], counts[rows] = ls[: len(rows)], nt[: len(rows)]
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
    generation_max_length: int | None = None,
    max_new_tokens: int | None = None,
    bucket: int = 16,
    progress: bool = False,
    return_ids: bool = False,
):
    """Greedy answers to ``questions``. Returns ``(prompt_texts, generations)``, with
    ``return_ids`` also ``(prompt_ids, generated_ids)`` (lists of token-id lists: the prompt the
    model saw and the new tokens before the first EOS; what a reference model rescores).

    Prompts are left-padded to the batch's longest prompt rounded up to ``bucket``
    tokens (``L``, so a jitted generator compiles a few shapes only). ``max_new_tokens``
    new tokens are generated (default 200, as open-unlearning and transformers); only
    when ``max_new_tokens`` is None and ``generation_max_length`` is given, TOFU's original
    budget ``generation_max_length − L`` (prompt + answer) is used. New tokens are cut at
    the first EOS and decoded with ``skip_special_tokens=True``.
    """
    if max_new_tokens is None and generation_max_length is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    prompts = [encode_prompt(tokenizer, q, fmt) for q in questions]
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    gens: list[str] = []
    gen_ids: list[list[int]] = []
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
        out = np.asarray(generate_fn(pad_rows(ids, batch_size), pad_rows(mask, batch_size), int(n_new)))
        for row in out[: len(chunk)]:
            row = row.tolist()
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            gen_ids.append(row)
            gens.append(tokenizer.decode(row, skip_special_tokens=True))
    if return_ids:
        return texts, gens, [list(p) for p in prompts], gen_ids
    return texts, gens


FLUENCY_KEYS = ("degenerate", "rep_4", "distinct_1", "distinct_2")  # per-row log keys (eval/fluency.py)


def generation_fluency(gens: Sequence[str], prompt_ids=None, gen_ids=None, ppl_logits_fn: LogitsFn | None = None,
                       tokenizer=None, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Fluency of generated answers, per row (``float64[N]`` each): :data:`FLUENCY_KEYS`
    (:func:`alter_jax.eval.fluency.answer_fluency`) and, with ``ppl_logits_fn`` (the untouched
    backbone), ``generated_ppl``: the backbone scores prompt + generated tokens, perplexity over the
    generated tokens (Eq. F1; NaN for an empty answer)."""
    from alter_jax.eval.fluency import answer_fluency, continuation_perplexities

    out = answer_fluency(gens, 4)
    if ppl_logits_fn is not None:
        if prompt_ids is None or gen_ids is None or tokenizer is None:
            raise ValueError("generation_fluency: the generated perplexity needs prompt_ids, gen_ids and the tokenizer")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        out["generated_ppl"] = continuation_perplexities(ppl_logits_fn, prompt_ids, gen_ids, pad, batch_size)
    return out


def fluency_summary(per_row: Mapping[str, Any]) -> dict[str, float | None]:
    """Split-level fluency from per-row values (arrays, or a log's ``{str(i): v}``):
    ``degenerate_rate`` (mean of ``degenerate``), ``rep_4``, ``distinct_1``, ``distinct_2`` (means),
    ``generated_ppl`` (mean over answers with a token) and ``generated_ppl_median``; None where
    absent."""
    from alter_jax.eval.fluency import finite_mean

    def vals(key):
        v = per_row.get(key)
        if v is None:
            return None
        return np.asarray(list(v.values()) if isinstance(v, Mapping) else v, np.float64)

    out: dict[str, float | None] = {}
    for key, name in (("degenerate", "degenerate_rate"), ("rep_4", "rep_4"), ("distinct_1", "distinct_1"),
                      ("distinct_2", "distinct_2"), ("generated_ppl", "generated_ppl")):
        v = vals(key)
        out[name] = None if v is None else finite_mean(v)
    v = vals("generated_ppl")
    fin = None if v is None else v[np.isfinite(v)]
    out["generated_ppl_median"] = float(np.median(fin)) if fin is not None and fin.size else None
    return out


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


def qa_token_stats(
    logits_fn: LogitsFn,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    fmt: str | PromptFormat = "auto",
    max_length: int = 200,
    batch_size: int = 8,
) -> tuple[list[TokenStats], dict[str, np.ndarray]]:
    """:class:`~alter_jax.eval.memorization.TokenStats` of each (question, answer) in the
    prompt format, and the encoded arrays ``{input_ids, attention_mask, labels}: int32[N, T]``."""
    enc = encode_qa_batch(tokenizer, questions, answers, fmt, max_length)
    stats = token_stats(logits_fn, enc["input_ids"], enc["attention_mask"], enc["labels"], batch_size)
    for i, st in enumerate(stats):
        if st.n_tokens == 0:
            raise ValueError(f"answer {i} ({answers[i][:40]!r}) has no scored token; raise max_length")
    return stats, enc


def _evaluate_split(rows, task, *, logits_fn, generate_fn, tokenizer, fmt, max_length, batch_size,
                    generation_max_length, max_new_tokens, progress, question_key, ppl_logits_fn=None):
    fmt = resolve_format(fmt, tokenizer)
    real = task in REAL_TASKS
    if any(question_key not in r for r in rows):
        raise ValueError(f"{task}: rows lack {question_key!r} (only forget / retain perturbed splits have "
                         "paraphrased_question); use question_key='question'")
    qs = [r[question_key] for r in rows]
    gts = [r["answer"] for r in rows]
    score = partial(score_answers, logits_fn, tokenizer, fmt=fmt, max_length=max_length,
                    batch_size=batch_size, progress=progress)
    stats, enc = qa_token_stats(logits_fn, tokenizer, qs, gts, fmt, max_length, batch_size)
    gt_sum = np.array([s.loss_sum for s in stats], np.float64)
    gt_n = np.array([s.n_tokens for s in stats], np.int64)
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
        texts, gens, p_ids, g_ids = generate_answers(generate_fn, tokenizer, qs, fmt, batch_size, generation_max_length,
                                                     max_new_tokens, progress=progress, return_ids=True)
        r1, rl = rouge_recall(gens, gts)
        log["generated_text"] = _keyed([[t, g, a] for t, g, a in zip(texts, gens, gts)])
        log["rouge1_recall"] = _keyed(r1)
        log["rougeL_recall"] = _keyed(rl)
        # fluency of the greedy answers (not in TOFU's logs; docs/eval_definitions.md, fluency)
        for key, vals in generation_fluency(gens, p_ids, g_ids, ppl_logits_fn, tokenizer, batch_size).items():
            log[key] = _keyed([None if not np.isfinite(v) else float(v) for v in vals])
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
    for name, vals in memorization_scores(stats).items():  # not in TOFU's logs; open-unlearning's metrics
        log[name] = _keyed(vals)
    return log, stats, enc


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
    generation_max_length: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    question_key: str = "question",
    ppl_logits_fn: LogitsFn | None = None,
) -> dict[str, dict[str, Any]]:
    """One TOFU task on ``rows`` -> the legacy log (metric -> {str(index): value}).

    ``task`` is a legacy log name (``eval_log_forget``, ``eval_log``,
    ``eval_real_author_wo_options``, ``eval_real_world_wo_options``); the real ones score
    ``answer`` in place of ``paraphrased_answer`` and add ``normalized_gt_loss``.
    ``generate_fn=None`` skips generation (no ROUGE / generated_text). ``question_key``:
    ``"paraphrased_question"`` asks every question in its paraphrased form (open-unlearning's
    ``question_key``). The log also holds per-row ``exact_memorization`` and
    ``extraction_strength`` of the ground-truth answer (absent from TOFU's own logs) and, with
    generation, the fluency of each greedy answer (:func:`generation_fluency`; ``generated_ppl``
    needs ``ppl_logits_fn``, the untouched backbone).
    """
    return _evaluate_split(rows, task, logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tokenizer, fmt=fmt,
                           max_length=max_length, batch_size=batch_size,
                           generation_max_length=generation_max_length, max_new_tokens=max_new_tokens,
                           progress=progress, question_key=question_key, ppl_logits_fn=ppl_logits_fn)[0]


# ----------------------------------------------------------------------- membership inference


def holdout_split_for(forget_split: str) -> str | None:
    """``forget10`` -> ``holdout10`` (the hub's unseen-author splits), None for other names."""
    base = forget_split.replace("_perturbed", "")
    return f"holdout{base[6:]}" if base.startswith("forget") and base[6:].isdigit() else None


def resolve_holdout(holdout: str | Sequence[Mapping] | None, forget_split: str, source, n: int,
                    per_author: int = 20) -> tuple[list[Mapping] | None, str]:
    """Holdout rows for the membership attacks and the name reported for them.

    ``holdout``: ``"auto"`` (the hub's ``holdoutXX`` matching ``forgetXX`` when the source
    has it, else none), ``None`` / ``"none"`` (no attack), a split name, ``"full:A-B"`` (TOFU
    authors A..B, 0-based blocks of ``per_author`` rows of ``full.json``: for models that never
    saw them), or rows. Rows are cut to ``n`` (the forget rows scored). Returns ``(rows or
    None, name or the reason there is none)``."""
    if holdout is None or holdout == "none":
        return None, "none (not requested)"
    if not isinstance(holdout, str):
        rows = list(holdout)
        return rows[:n], f"{len(rows[:n])} given rows"
    if holdout.startswith("full:"):
        spec = holdout[5:]
        try:
            a, _, b = spec.partition("-")
            first, last = int(a), int(b or a)
        except ValueError:
            raise ValueError(f"holdout {holdout!r}: expected full:A-B (0-based author indices), e.g. full:180-199") from None
        blocks = author_blocks(load_tofu_split("full", source), per_author)
        if not 0 <= first <= last < len(blocks):
            raise ValueError(f"holdout {holdout!r}: full.json has authors 0..{len(blocks) - 1}")
        rows = [r for blk in blocks[first:last + 1] for r in blk]
        if len(rows) < n:
            warnings.warn(f"holdout {holdout}: {len(rows)} rows for {n} forget rows (sizes differ)")
        return rows[:n], f"full.json authors {first}-{last} ({len(rows[:n])} rows)"
    name = holdout_split_for(forget_split) if holdout == "auto" else holdout
    if name is None:
        return None, f"none (no holdout split matches forget split {forget_split!r}; pass holdout)"
    try:
        rows = load_tofu_split(name, source)
    except TofuDataError as e:
        if holdout == "auto":
            return None, f"none ({name} not in {source}: pass holdout='full:A-B' or a split)"
        raise ValueError(f"holdout split {name!r}: {e}") from e
    return rows[:n], f"{name} ({len(rows[:n])} rows)"


def _drop_last_label(labels: np.ndarray) -> np.ndarray:
    """Labels with each row's last scored token set to -100 (open-unlearning's token-wise attacks)."""
    out = labels.copy()
    for b in range(len(out)):
        idx = np.nonzero(out[b] != IGNORE_INDEX)[0]
        if len(idx):
            out[b, idx[-1]] = IGNORE_INDEX
    return out


def run_mia(
    forget: tuple[list[TokenStats], Mapping[str, np.ndarray]],
    holdout: tuple[list[TokenStats], Mapping[str, np.ndarray]],
    tokenizer,
    *,
    attacks: Sequence[str] = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference"),
    ref_forget: Sequence[TokenStats] | None = None,
    ref_holdout: Sequence[TokenStats] | None = None,
    gradnorm_fn: M.GradNormFn | None = None,
    k: float = M.DEFAULT_K,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Scores and AUC of each attack on forget vs holdout ``(stats, encoded arrays)``.
    ``gradnorm`` / ``reference`` are skipped (with the reason) without a GradNormFn /
    reference statistics. Returns ``{attack: {"auc", "forget", "holdout"} | {"skipped"}}``."""
    out: dict[str, dict[str, Any]] = {}
    sides = {"forget": forget, "holdout": holdout}
    refs = {"forget": ref_forget, "holdout": ref_holdout}
    for attack in attacks:
        if attack == "gradnorm" and gradnorm_fn is None:
            out[attack] = {"skipped": "no GradNormFn (the model's gradients are not available)"}
            continue
        if attack == "reference" and (ref_forget is None or ref_holdout is None):
            out[attack] = {"skipped": "no reference model"}
            continue
        scores = {}
        for side, (stats, enc) in sides.items():
            kw: dict[str, Any] = {}
            if attack == "zlib":
                kw["texts"] = [tokenizer.decode(s.label_ids.tolist(), skip_special_tokens=True) for s in stats]
            if attack == "reference":
                kw["ref_stats"] = refs[side]
            if attack == "gradnorm":
                labels = _drop_last_label(np.asarray(enc["labels"]))
                gn = [np.asarray(gradnorm_fn(enc["input_ids"][s:s + batch_size], enc["attention_mask"][s:s + batch_size],
                                             labels[s:s + batch_size]), np.float64)
                      for s in range(0, len(labels), batch_size)]
                kw["grad_norms"] = np.concatenate(gn)
            scores[side] = M.attack_scores(attack, stats, k=k, **kw)
        out[attack] = {"auc": M.mia_auc(scores["forget"], scores["holdout"]),
                       "forget": scores["forget"].tolist(), "holdout": scores["holdout"].tolist()}
    return out


def evaluate_tofu(
    logits_fn: LogitsFn,
    generate_fn: GenerateFn | None,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    forget_split: str = "forget10",
    source: str | os.PathLike = DEFAULT_SOURCE,
    fmt: str | PromptFormat = "auto",
    ds_size: int | None = None,
    batch_size: int = 8,
    max_length: int = 200,
    generation_max_length: int | None = None,
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS,
    retain_logs: str | os.PathLike | None = None,
    progress: bool = True,
    system_prompt: str | None = None,
    paraphrased_questions: bool = False,
    holdout: str | Sequence[Mapping] | None = "auto",
    attacks: Sequence[str] = M.ATTACKS,
    gradnorm_fn: M.GradNormFn | None = None,
    reference_logits_fn: LogitsFn | None = None,
    mia_k: float = M.DEFAULT_K,
    ppl_logits_fn: LogitsFn | None = None,
    ppl_reference: str | None = None,
) -> dict[str, Any]:
    """Run the four TOFU tasks, write the legacy logs, ``TOFU_EVAL.json`` /
    ``TOFU_SUMMARY.json`` and ``summary.json`` in ``out_dir``.

    ``ds_size``: first N rows per split (None = all, as open-unlearning). ``max_new_tokens``:
    new tokens per greedy answer (pass ``max_new_tokens=None, generation_max_length=200`` for
    TOFU's original prompt-inclusive budget). ``system_prompt``: a preset name or text
    (:func:`alter_jax.data.prompts.with_system_prompt`). ``paraphrased_questions``: also run
    forget and retain with ``paraphrased_question`` (splits ``*_paraphrased_question``).
    ``holdout`` (:func:`resolve_holdout`), ``attacks``, ``gradnorm_fn`` and
    ``reference_logits_fn`` drive the membership attacks. Returns the summary; its
    ``"metrics"`` is the flat object of :func:`metrics_object`. Forget Quality (and the
    retain AUC of PrivLeak) need ``retain_logs`` (a retain model's log folder: ours, TOFU's
    or open-unlearning's ``TOFU_EVAL.json``). ``ppl_logits_fn``: the untouched backbone that scores
    each greedy answer for ``generated_ppl`` (None: not measured); ``ppl_reference`` names it in
    the summary's config.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = with_system_prompt(fmt, tokenizer, system_prompt)
    common = dict(logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tokenizer, fmt=fmt, max_length=max_length,
                  batch_size=batch_size, generation_max_length=generation_max_length, max_new_tokens=max_new_tokens,
                  progress=progress, ppl_logits_fn=ppl_logits_fn)
    logs: dict[str, dict] = {}
    forget_eval = None
    for task, split in EVAL_TASKS.items():
        rows = load_tofu_split(split.format(forget=forget_split.replace("_perturbed", "")), source)
        if ds_size:
            rows = rows[:ds_size]
        log, stats, enc = _evaluate_split(rows, task, question_key="question", **common)
        logs[task] = log
        if task == "eval_log_forget":
            forget_eval = (rows, stats, enc)
        if paraphrased_questions and task not in REAL_TASKS:
            logs[task + PQ_SUFFIX] = _evaluate_split(rows, task + PQ_SUFFIX, question_key="paraphrased_question",
                                                     **common)[0]
    for task, log in logs.items():
        with open(out / f"{task}.json", "w", encoding="utf-8") as fh:
            json.dump(log, fh, indent=2)

    mia_res, holdout_name = None, "none"
    assert forget_eval is not None
    f_rows, f_stats, f_enc = forget_eval
    h_rows, holdout_name = resolve_holdout(holdout, forget_split, source, len(f_rows))
    if h_rows is not None and attacks:
        h_stats, h_enc = qa_token_stats(logits_fn, tokenizer, [r["question"] for r in h_rows],
                                        [r["answer"] for r in h_rows], fmt, max_length, batch_size)
        ref_f = ref_h = None
        if reference_logits_fn is not None and "reference" in attacks:
            ref_f = token_stats(reference_logits_fn, f_enc["input_ids"], f_enc["attention_mask"], f_enc["labels"], batch_size)
            ref_h = token_stats(reference_logits_fn, h_enc["input_ids"], h_enc["attention_mask"], h_enc["labels"], batch_size)
        mia_res = run_mia((f_stats, f_enc), (h_stats, h_enc), tokenizer, attacks=attacks, ref_forget=ref_f,
                          ref_holdout=ref_h, gradnorm_fn=gradnorm_fn, k=mia_k, batch_size=batch_size)

    retain = read_logs(retain_logs, required=("eval_log_forget.json",)) if retain_logs is not None else None
    retain_auc = retain_mia_auc(retain_logs) if retain_logs is not None else None
    metrics = metrics_object(logs, mia_res, retain, retain_auc, holdout_name)
    ou = tofu_eval_from_logs(logs, mia_res, metrics)
    with open(out / OU_EVAL_FILE, "w", encoding="utf-8") as fh:
        json.dump(ou, fh, indent=4)
    with open(out / OU_SUMMARY_FILE, "w", encoding="utf-8") as fh:
        json.dump({k: v["agg_value"] for k, v in sorted(ou.items()) if isinstance(v, dict) and "agg_value" in v},
                  fh, indent=4)
    summary = aggregate(out, retain_logs) if generate_fn is not None else {"note": "no generation: no aggregate"}
    summary["metrics"] = metrics
    summary["config"] = {
        "forget_split": forget_split, "source": str(source), "prompt_format": fmt.name,
        "system_prompt": fmt.system_prompt, "date_string": fmt.date_string,
        "ds_size": ds_size, "max_length": max_length, "generation_max_length": generation_max_length,
        "max_new_tokens": max_new_tokens, "holdout": holdout_name, "mia_k": mia_k,
        "paraphrased_questions": paraphrased_questions,
        "fluency_reference": (ppl_reference or "given") if ppl_logits_fn is not None else None,
    }
    metrics["config"] = summary["config"]
    with open(out / SUMMARY_FILE, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary



# ------------------------------------------------------------------------- aggregation


def _load_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TofuLogsError(f"{f}: not valid JSON ({e}); re-run the evaluation") from e


def _ou_file(path: Path) -> Path | None:
    """The open-unlearning TOFU_EVAL.json at ``path`` (a file, or inside a folder), if any."""
    if path.is_file() and path.suffix == ".json":
        return path
    f = path / OU_EVAL_FILE
    return f if f.is_file() else None


def read_logs(folder: str | os.PathLike, required: Sequence[str] = tuple(LOG_FILES)) -> dict[str, dict]:
    """The legacy logs of a folder -> ``{file name: log}``: ours (``evaluate_tofu``), TOFU's
    (``eval_results/ds_size300``, four files or one ``eval_log_aggregated.json``), or
    open-unlearning's ``TOFU_EVAL.json`` (the folder holding it, or the file itself),
    converted by :func:`logs_from_tofu_eval`. ``required``: the files that must be found."""
    p = Path(folder)
    if not p.exists():
        raise TofuLogsError(f"TOFU log folder {p} does not exist (expected {', '.join(LOG_FILES)} or {OU_EVAL_FILE})")
    agg = ou = None
    logs = {}
    for name in LOG_FILES:
        f = p / name
        if p.is_dir() and f.is_file():
            logs[name] = _load_json(f)
            continue
        if agg is None and p.is_dir() and (p / AGGREGATED_FILE).is_file():
            agg = _load_json(p / AGGREGATED_FILE)
        if agg is not None and name in agg:
            logs[name] = agg[name]
            continue
        if ou is None and _ou_file(p) is not None:
            ou = logs_from_tofu_eval(_load_json(_ou_file(p)), str(_ou_file(p)))
        if ou is not None and name in ou:
            logs[name] = ou[name]
    missing = [n for n in required if n not in logs]
    if missing:
        raise TofuLogsError(
            f"TOFU log folder {p} lacks {', '.join(missing)} (and no {AGGREGATED_FILE} or {OU_EVAL_FILE} holds them); "
            "point --logs at a folder written by `evaluate tofu`, TOFU's eval_results/ds_size300 or "
            f"open-unlearning's {OU_EVAL_FILE}"
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
    """r = exp(mean(average_perturb_loss) − avg_paraphrased_loss) per question; from a log
    with only ``truth_ratio`` (TOFU's logged P_pert/P_para, open-unlearning's score), 1 / it."""
    if "avg_paraphrased_loss" not in log and "truth_ratio" in log:
        return 1.0 / _values(log, "truth_ratio", where)
    para = _values(log, "avg_paraphrased_loss", where)
    pert = _values(log, "average_perturb_loss", where)
    return np.exp(pert.mean(axis=-1) - para)


def _correct_wrong(log: Mapping, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(p_correct, p_wrong) per question: exp(−avg_paraphrased_loss), exp(−mean average_perturb_loss)."""
    para = _values(log, "avg_paraphrased_loss", where)
    pert = _values(log, "average_perturb_loss", where)
    return np.exp(-para), np.exp(-pert.mean(axis=-1))


def truth_ratio_prob_mean(log: Mapping, where: str = "log") -> float:
    """open-unlearning's ``prob_mean`` truth ratio: mean p_c / (p_c + p_w + 1e-10)."""
    c, w = _correct_wrong(log, where)
    return float(np.mean(c / (c + w + 1e-10)))


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


def split_metrics(log: Mapping, task: str) -> dict[str, float | None]:
    """The per-split object of the ``--json`` output (keys :data:`PER_SPLIT_METRICS`; None
    where the log lacks the inputs, e.g. no generation or TOFU's logs without EM/ES)."""
    fname = task + ".json"
    out: dict[str, float | None] = dict.fromkeys(PER_SPLIT_METRICS)
    logv = dict(log)
    if "rougeL_recall" not in logv:
        logv["rougeL_recall"] = {"0": float("nan")}
    sc = task_scores(logv, fname)
    out["prob"], out["truth_ratio"] = sc["Prob."], sc["Truth Ratio"]
    out["rouge_l_recall"] = sc["ROUGE"] if "rougeL_recall" in log else None
    if "avg_paraphrased_loss" in log:
        out["truth_ratio_prob_mean"] = truth_ratio_prob_mean(log, fname)
    for key in ("exact_memorization", "extraction_strength"):
        if key in log:
            out[key] = mean_defined(list(log[key].values()))
    if "degenerate" in log:  # fluency of the greedy answers (logs written before it have none)
        out.update(fluency_summary({k: {i: (np.nan if v is None else v) for i, v in log[k].items()}
                                    for k in (*FLUENCY_KEYS, "generated_ppl") if k in log}))
    return out


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


def aggregate_score(fq: float | None, mu: float | None) -> float | None:
    """``aggregate`` = harmonic mean of Forget Quality and Model Utility (0 if either is 0)."""
    if fq is None or mu is None:
        return None
    from scipy.stats import hmean

    return float(hmean([fq, mu])) if fq > 0 and mu > 0 else 0.0


def retain_mia_auc(retain_logs_dir: str | os.PathLike, attack: str = M.PRIVLEAK_ATTACK) -> float | None:
    """The retain model's AUC of ``attack`` from its ``TOFU_EVAL.json`` (``mia_<attack>``), if there."""
    f = _ou_file(Path(retain_logs_dir))
    if f is None:
        return None
    entry = _load_json(f).get(f"mia_{attack}")
    return None if not isinstance(entry, dict) or entry.get("agg_value") is None else float(entry["agg_value"])


def mia_from_tofu_eval(data: Mapping) -> tuple[dict[str, dict] | None, str]:
    """MIA results ``{attack: {"auc", "forget", "holdout"}}`` and the holdout name from a TOFU_EVAL.json."""
    res = {}
    for attack in M.ATTACKS:
        e = data.get(f"mia_{attack}")
        if isinstance(e, dict) and e.get("auc") is not None:
            res[attack] = {"auc": float(e["auc"]),
                           "forget": [v["score"] for v in e.get("forget", {}).get("value_by_index", {}).values()],
                           "holdout": [v["score"] for v in e.get("holdout", {}).get("value_by_index", {}).values()]}
    name = (data.get("mia_holdout") or {}).get("name", "unknown (from TOFU_EVAL.json)")
    return (res or None), name


def metrics_object(logs: Mapping[str, Mapping], mia: Mapping[str, Mapping] | None = None,
                   retain_logs: Mapping[str, Mapping] | None = None, retain_auc: float | None = None,
                   holdout_name: str = "none") -> dict[str, Any]:
    """The flat result of ``bin/evaluate tofu --json``: per split (``forget``, ``retain``,
    ``real_authors``, ``world_facts``, and ``*_paraphrased_question``) the metrics of
    :func:`split_metrics`; ``mia_<attack>_auc`` (None when not run); ``privleak`` (Min-K%,
    percent; against the retain model's AUC, else 0.5, named in ``privleak_reference``);
    ``forget_quality``, ``model_utility``, ``aggregate``; ``holdout``. ``logs`` is keyed by
    task (``eval_log_forget``) or file name (``eval_log_forget.json``)."""
    by_task = {k[:-5] if k.endswith(".json") else k: v for k, v in logs.items()}
    out: dict[str, Any] = {}
    for task, log in by_task.items():
        base = task[: -len(PQ_SUFFIX)] if task.endswith(PQ_SUFFIX) else task
        if base in SPLIT_NAMES:
            out[SPLIT_NAMES[base] + task[len(base):]] = split_metrics(log, base)
    for attack in M.ATTACKS:
        e = (mia or {}).get(attack) or {}
        out[f"mia_{attack}_auc"] = e.get("auc")
    auc = out[f"mia_{M.PRIVLEAK_ATTACK}_auc"]
    ref = retain_auc if retain_auc is not None else M.PRIVLEAK_DEFAULT_RETAIN_AUC
    out["privleak"] = None if auc is None else M.privleak(auc, ref)
    out["privleak_reference"] = (f"retain model's mia_{M.PRIVLEAK_ATTACK} AUC {retain_auc}" if retain_auc is not None
                                 else f"default AUC_retain {M.PRIVLEAK_DEFAULT_RETAIN_AUC} (no retain-model MIA logs)")
    files = {t + ".json": v for t, v in by_task.items()}
    have_all = all(f in files and "rougeL_recall" in files[f] for f in LOG_FILES)
    out["model_utility"] = model_utility(files)[0] if have_all else None
    out["forget_quality"] = (forget_quality(files, retain_logs)[0]
                             if retain_logs is not None and "eval_log_forget.json" in files else None)
    out["aggregate"] = aggregate_score(out["forget_quality"], out["model_utility"])
    out["holdout"] = holdout_name
    return out


# ------------------------------------------------------------- open-unlearning's TOFU_EVAL.json


def _by_index(log: Mapping, key: str) -> dict[str, Any]:
    return {k: log[key][k] for k in sorted(log[key], key=int)}


def tofu_eval_from_logs(logs: Mapping[str, Mapping], mia: Mapping[str, Mapping] | None = None,
                        metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """open-unlearning's ``TOFU_EVAL.json`` from our legacy logs (keyed by task): per index
    ``{"prob", "avg_loss"}`` for ``<p>_Q_A_Prob`` / ``_PARA_Prob`` / ``_PERT_Prob`` (lists),
    ROUGE entries, truth ratios (score = p_w / (p_c + 1e-10)), ``ra/wf_Q_A_Prob_normalised``,
    EM / ES (``exact_memorization`` / ``extraction_strength`` for forget, ``<p>_...`` otherwise),
    ``mia_<attack>`` (``forget`` / ``holdout`` / ``auc``), and the scalars of ``metrics``
    (``forget_quality``, ``model_utility``, ``privleak``) as ``{"agg_value"}``. Prefixes:
    forget, retain, ra, wf (<p>)."""
    out: dict[str, Any] = {}
    for task, prefix in OU_PREFIX.items():
        if task not in logs:
            continue
        log = logs[task]
        real = task in REAL_TASKS
        gt = _by_index(log, "avg_gt_loss")
        out[f"{prefix}_Q_A_Prob"] = {
            "agg_value": float(np.mean([math.exp(-v) for v in gt.values()])),
            "value_by_index": {k: {"prob": math.exp(-v), "avg_loss": v} for k, v in gt.items()}}
        if not real:
            para = _by_index(log, "avg_paraphrased_loss")
            out[f"{prefix}_Q_A_PARA_Prob"] = {
                "agg_value": float(np.mean([math.exp(-v) for v in para.values()])),
                "value_by_index": {k: {"prob": math.exp(-v), "avg_loss": v} for k, v in para.items()}}
        pert = _by_index(log, "average_perturb_loss")
        out[f"{prefix}_Q_A_PERT_Prob"] = {
            "agg_value": float(np.mean([np.mean(np.exp(-np.asarray(v))) for v in pert.values()])),
            "value_by_index": {k: {"prob": [math.exp(-x) for x in v], "avg_loss": list(v)} for k, v in pert.items()}}
        if "rougeL_recall" in log:
            gen = log.get("generated_text", {})
            out[f"{prefix}_Q_A_ROUGE"] = {
                "agg_value": float(np.mean(list(log["rougeL_recall"].values()))),
                "value_by_index": {k: {"rouge1_recall": log["rouge1_recall"][k], "rougeL_recall": v,
                                       **({"input": gen[k][0], "generation": gen[k][1], "ground_truth": gen[k][2]}
                                          if k in gen else {})}
                                   for k, v in _by_index(log, "rougeL_recall").items()}}
        correct = np.exp(-np.asarray(list((para if not real else gt).values()), np.float64))
        wrong = np.exp(-np.asarray([np.mean(v) for v in pert.values()], np.float64))
        tr = wrong / (correct + 1e-10)
        agg = np.mean(np.minimum(tr, 1 / (tr + 1e-10))) if prefix == "forget" else np.mean(np.maximum(0, 1 - tr))
        keys = list(gt)
        out[OU_TR_KEY[prefix]] = {"agg_value": float(agg),
                                  "value_by_index": {k: {"score": float(v)} for k, v in zip(keys, tr)}}
        pm = correct / (correct + wrong + 1e-10)
        out[f"{prefix}_truth_ratio_prob_mean"] = {"agg_value": float(np.mean(pm)),
                                                  "value_by_index": {k: {"score": float(v)} for k, v in zip(keys, pm)}}
        if real:
            p_t = correct
            p_w = np.exp(-np.asarray(list(pert.values()), np.float64)).sum(-1)
            norm = p_t / (p_t + p_w + 1e-10)
            out[f"{prefix}_Q_A_Prob_normalised"] = {
                "agg_value": float(np.mean(norm)), "value_by_index": {k: {"prob": float(v)} for k, v in zip(keys, norm)}}
        for key in ("exact_memorization", "extraction_strength"):
            if key in log:
                vals = _by_index(log, key)
                out[key if prefix == "forget" else f"{prefix}_{key}"] = {
                    "agg_value": mean_defined(list(vals.values())),
                    "value_by_index": {k: {"score": v} for k, v in vals.items()}}
        if "degenerate" in log:  # ours (issue 19): per-row fluency of the greedy answers, agg = degenerate rate
            keys = [k for k in (*FLUENCY_KEYS, "generated_ppl") if k in log]
            out[f"{prefix}_fluency"] = {
                "agg_value": fluency_summary({"degenerate": log["degenerate"]})["degenerate_rate"],
                "value_by_index": {i: {k: log[k].get(i) for k in keys} for i in sorted(log["degenerate"], key=int)}}
    for attack, e in (mia or {}).items():
        if "auc" not in e:
            continue
        out[f"mia_{attack}"] = {
            side: {"agg_value": float(np.mean(e[side])), "value_by_index": {str(i): {"score": float(v)}
                                                                          for i, v in enumerate(e[side])}}
            for side in ("forget", "holdout")}
        out[f"mia_{attack}"].update({"auc": e["auc"], "agg_value": e["auc"]})
    if metrics is not None:
        for key in ("forget_quality", "model_utility", "privleak", "aggregate"):
            out[key] = {"agg_value": metrics.get(key)}
        out["mia_holdout"] = {"name": metrics.get("holdout")}
    return out


def logs_from_tofu_eval(data: Mapping[str, Any], where: str = OU_EVAL_FILE) -> dict[str, dict]:
    """Legacy logs ``{file name: log}`` from an open-unlearning ``TOFU_EVAL.json``: ``avg_gt_loss``
    (``<p>_Q_A_Prob``), ``avg_paraphrased_loss`` (``<p>_Q_A_PARA_Prob``; the answer's for ra / wf),
    ``average_perturb_loss`` (``<p>_Q_A_PERT_Prob``), ROUGE, and ``truth_ratio`` (the truth-ratio
    metric's per-index score, used for Forget Quality when the probabilities are absent).
    A split is present when any of its entries is."""
    if not isinstance(data, Mapping):
        raise TofuLogsError(f"{where}: expected a JSON object of open-unlearning metrics")

    def vbi(key: str) -> dict[str, Any] | None:
        e = data.get(key)
        if not isinstance(e, Mapping) or not isinstance(e.get("value_by_index"), Mapping):
            return None
        return {str(k): v for k, v in e["value_by_index"].items() if v is not None}

    out: dict[str, dict] = {}
    for task, prefix in OU_PREFIX.items():
        log: dict[str, dict] = {}
        gt, para, pert = vbi(f"{prefix}_Q_A_Prob"), vbi(f"{prefix}_Q_A_PARA_Prob"), vbi(f"{prefix}_Q_A_PERT_Prob")
        rouge, tr = vbi(f"{prefix}_Q_A_ROUGE"), vbi(OU_TR_KEY[prefix])
        if gt is not None:
            log["avg_gt_loss"] = {k: v["avg_loss"] for k, v in gt.items()}
        if task in REAL_TASKS and gt is not None:
            para = gt
        if para is not None:
            log["avg_paraphrased_loss"] = {k: v["avg_loss"] for k, v in para.items()}
        if pert is not None:
            log["average_perturb_loss"] = {k: v["avg_loss"] for k, v in pert.items()}
        if rouge is not None:
            log["rougeL_recall"] = {k: v["rougeL_recall"] for k, v in rouge.items()}
            if all("rouge1_recall" in v for v in rouge.values()):
                log["rouge1_recall"] = {k: v["rouge1_recall"] for k, v in rouge.items()}
            if all(("input" in v and "generation" in v) for v in rouge.values()):
                log["generated_text"] = {k: [v["input"], v["generation"], v.get("ground_truth", "")]
                                         for k, v in rouge.items()}
        if tr is not None:
            log["truth_ratio"] = {k: v["score"] for k, v in tr.items()}
        for key in ("exact_memorization", "extraction_strength"):
            e = vbi(key if prefix == "forget" else f"{prefix}_{key}")
            if e is not None:
                log[key] = {k: v["score"] for k, v in e.items()}
        flu = vbi(f"{prefix}_fluency")
        if flu:
            for key in (*FLUENCY_KEYS, "generated_ppl"):
                if all(key in v for v in flu.values()):
                    log[key] = {k: v[key] for k, v in flu.items()}
        if log:
            out[task + ".json"] = log
    return out


def aggregate(logs_dir: str | os.PathLike, retain_logs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Model Utility (+ its 9 parts), forget-split scores and, with a retain model's logs,
    Forget Quality, from log folders (ours, TOFU's or open-unlearning's ``TOFU_EVAL.json``);
    ``"metrics"`` is the flat object of :func:`metrics_object` (MIA from the folder's
    ``TOFU_EVAL.json`` when present)."""
    logs = read_logs(logs_dir)
    mu, parts = model_utility(logs, logs_dir)
    forget = {f"Forget {k}": v for k, v in task_scores(logs["eval_log_forget.json"], "eval_log_forget.json",
                                                       _where(logs_dir, "eval_log_forget.json")).items()}
    out: dict[str, Any] = {"model_utility": mu, "parts": parts, "forget": forget,
                           "forget_quality": None, "ks_statistic": None,
                           "logs": str(logs_dir), "retain_logs": None if retain_logs_dir is None else str(retain_logs_dir)}
    retain = None
    if retain_logs_dir is not None:
        retain = read_logs(retain_logs_dir, required=("eval_log_forget.json",))
        fq, ks = forget_quality(logs, retain, logs_dir, retain_logs_dir)
        out["forget_quality"], out["ks_statistic"] = fq, ks
    ou = _ou_file(Path(logs_dir))
    mia, holdout = mia_from_tofu_eval(_load_json(ou)) if ou is not None else (None, "none")
    p = Path(logs_dir)
    extra = {}
    if p.is_dir():
        for task in ("eval_log_forget", "eval_log"):
            f = p / f"{task}{PQ_SUFFIX}.json"
            if f.is_file():
                extra[task + PQ_SUFFIX] = _load_json(f)
    out["metrics"] = metrics_object({**logs, **extra}, mia, retain,
                                    retain_mia_auc(retain_logs_dir) if retain_logs_dir is not None else None, holdout)
    out["aggregate"] = out["metrics"]["aggregate"]
    return out
