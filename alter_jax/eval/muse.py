"""MUSE metrics (Shi et al. 2024, github.com/swj0419/muse_bench): VerbMem, KnowMem, PrivLeak.

Definitions (all as the MUSE reference code computes them; docs/eval_definitions.md):

- ROUGE-L: ``rouge_score.RougeScorer(["rougeL"], use_stemmer=False).score(target=gt,
  prediction=output)``; MUSE's reported ``mean_rougeL`` is the mean **F1** (``fmeasure``).
  Recall is returned alongside.
- VerbMem: greedy continuation (``max_new_tokens=128``) of ``prompt`` (tokenised with
  special tokens); the reference is ``gt`` cut to its first ``max_new_tokens`` tokens
  (``tok(gt, add_special_tokens=True)[:128]``, decoded without special tokens).
  VerbMem = mean ROUGE-L F1 (MUSE prints it x100).
- KnowMem: few-shot prompt ``"Question: {q}\\nAnswer: {a}\\n\\n"`` for each in-context pair
  (split ``<split>_icl``), then ``"Question: {q}\\nAnswer: "``; greedy, 32 new tokens; the
  output is cut before the first ``"\\n\\n"``, ``"\\nQuestion"`` or ``"Question:"``.
  KnowMem = mean ROUGE-L F1 against the gold answer.
- Min-K% Prob (Shi et al. 2023): ``mean`` of the lowest ``max(1, floor(k * n))`` of the
  n token log-probs ``log p(x_t | x_<t)`` (t >= 1, text tokenised with special tokens);
  higher = more member-like. MUSE uses k = 40 %.
- AUC (MUSE convention, key ``forget_holdout_Min-40%``): ``P(s(holdout) > s(forget)) +
  0.5 P(tie)``, i.e. 1 - the usual AUC that treats forget texts as members. A model that
  memorised the forget set scores ~0; one that never saw it ~0.5.
- PrivLeak = ``(AUC_unlearned - AUC_retrain) / AUC_retrain * 100`` (percent; ~0 is ideal,
  strongly negative = under-unlearning, positive = over-unlearning).
- Exact Memorization / Extraction Strength on ``verbmem/forget`` (open-unlearning's MUSE
  ``exact_memorization`` / ``extraction_strength``; :mod:`alter_jax.eval.memorization`):
  teacher-forced on ``prompt + " " + gt`` (tokenised with special tokens, cut to the prompt's
  tokens + ``max_length``), the labels being the tokens after the prompt (no EOS added; the
  last label is dropped, as open-unlearning's token-wise metrics do).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from alter_jax.data.batching import length_sorted_batches
from alter_jax.data.muse import QAItem, VerbMemItem
from alter_jax.eval.fluency import token_logprobs
from alter_jax.eval.memorization import mean_defined, memorization_scores, token_stats

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
GenerateFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

# AUC of MUSE's retrained models for key forget_holdout_Min-40% (muse_bench constants.py).
AUC_RETRAIN = {"news": 0.4772, "books": 0.5393}
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")

_SCORER = None


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L of ``prediction`` against ``reference``: {"precision", "recall", "f1"}."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    s = _SCORER.score(reference, prediction)["rougeL"]
    return {"precision": float(s.precision), "recall": float(s.recall), "f1": float(s.fmeasure)}


# ----------------------------------------------------------------------------- generation
def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def generate_texts(
    generate_fn: GenerateFn,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    max_prompt_tokens: int | None = None,
    pad_multiple: int = 32,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` through ``generate_fn``.

    Prompts are left-padded to ``[batch_size, ceil(T / pad_multiple) * pad_multiple]``
    (``max_prompt_tokens`` keeps the last tokens); the new tokens are cut at the first EOS
    and decoded with ``skip_special_tokens=True, clean_up_tokenization_spaces=True``."""
    pad_id, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    enc = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    if max_prompt_tokens is not None:
        enc = [e[-max_prompt_tokens:] for e in enc]
    out: list[str | None] = [None] * len(prompts)
    n_batches = (len(enc) + batch_size - 1) // batch_size
    batches = length_sorted_batches(enc, batch_size, pad_id, pad_multiple, left=True)
    for idx, ids, mask in tqdm(batches, total=n_batches, desc=desc, disable=not progress):
        new = np.asarray(generate_fn(ids, mask, max_new_tokens))
        if new.ndim != 2 or new.shape[0] != batch_size:
            raise ValueError(f"GenerateFn returned shape {new.shape}; expected [{batch_size}, max_new_tokens]")
        for r, i in enumerate(idx):
            toks = [int(t) for t in new[r]]
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            out[i] = tokenizer.decode(toks, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return out  # type: ignore[return-value]


def _mean(vals: list[float]) -> float:
    return float(np.mean(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------- VerbMem
def truncate_reference(tokenizer, gt: str, max_tokens: int) -> str:
    """MUSE's reference for VerbMem: ``gt`` cut to ``tok(gt, add_special_tokens=True)[:max_tokens]``."""
    ids = tokenizer(gt, add_special_tokens=True)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def eval_verbmem(
    items: Sequence[VerbMemItem],
    generate_fn: GenerateFn,
    tokenizer,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """VerbMem: mean ROUGE-L F1 between greedy continuations and the (truncated) true ones.

    Returns ``{"verbmem": mean F1, "rougeL_f1", "rougeL_recall", "n", "per_item": [...]}``."""
    outs = generate_texts(generate_fn, tokenizer, [it.prompt for it in items], max_new_tokens,
                          batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, progress=progress, desc="verbmem")
    per = []
    for it, out in zip(items, outs):
        ref = truncate_reference(tokenizer, it.gt, max_new_tokens)
        per.append({"prompt": it.prompt, "gt": ref, "output": out, **{f"rougeL_{k}": v for k, v in rouge_l(out, ref).items()}})
    f1 = _mean([p["rougeL_f1"] for p in per])
    return {"verbmem": f1, "rougeL_f1": f1, "rougeL_recall": _mean([p["rougeL_recall"] for p in per]),
            "n": len(per), "per_item": per}


# ----------------------------------------------------------------------------- KnowMem
def knowmem_prompt(question: str, icl: Sequence[QAItem] = ()) -> str:
    """MUSE few-shot QA prompt."""
    prefix = "".join(f"Question: {q.question}\nAnswer: {q.answer}\n\n" for q in icl)
    return prefix + f"Question: {question}\nAnswer: "


def cut_answer(text: str, stops: Sequence[str] = KNOWMEM_STOPS) -> str:
    """Keep the text before the first occurrence of each stop string (applied in order)."""
    for s in stops:
        text = text.split(s)[0]
    return text


def eval_knowmem(
    items: Sequence[QAItem],
    generate_fn: GenerateFn,
    tokenizer,
    icl: Sequence[QAItem] = (),
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """KnowMem: mean ROUGE-L F1 of the model's few-shot answers against the gold answers.

    Returns ``{"knowmem": mean F1, "rougeL_f1", "rougeL_recall", "n", "per_item": [...]}``."""
    prompts = [knowmem_prompt(it.question, icl) for it in items]
    outs = generate_texts(generate_fn, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                          progress=progress, desc="knowmem")
    per = []
    for it, out in zip(items, outs):
        ans = cut_answer(out)
        per.append({"question": it.question, "gt": it.answer, "output": ans,
                    **{f"rougeL_{k}": v for k, v in rouge_l(ans, it.answer).items()}})
    f1 = _mean([p["rougeL_f1"] for p in per])
    return {"knowmem": f1, "rougeL_f1": f1, "rougeL_recall": _mean([p["rougeL_recall"] for p in per]),
            "n": len(per), "per_item": per}


# ----------------------------------------------------------------------------- PrivLeak
def min_k_prob(logprobs: np.ndarray, k: float = 0.4) -> float:
    """Min-K% Prob: mean of the lowest ``max(1, floor(k * n))`` token log-probs (higher = member-like)."""
    lp = np.sort(np.asarray(logprobs, dtype=np.float64).ravel())
    if lp.size == 0:
        raise ValueError("min_k_prob: a text with fewer than 2 tokens has no scored token")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min_k_prob: k must be in (0, 1], got {k}")
    n = max(1, int(k * lp.size))
    return float(lp[:n].mean())


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """AUC = P(s_pos > s_neg) + 0.5 P(tie), from the Mann-Whitney rank statistic."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("roc_auc: both groups need at least one score")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def muse_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's AUC for ``forget_holdout``: holdout is the positive class, ``P(s(holdout) > s(forget))``."""
    return roc_auc(holdout_scores, forget_scores)


def privleak(auc_unlearned: float, auc_retrain: float) -> float:
    """PrivLeak (percent) = (AUC_unlearned - AUC_retrain) / AUC_retrain * 100."""
    if auc_retrain <= 0:
        raise ValueError(f"privleak: AUC_retrain must be > 0, got {auc_retrain}")
    return float((auc_unlearned - auc_retrain) / auc_retrain * 100.0)


def text_min_k_scores(
    texts: Sequence[str],
    logits_fn: LogitsFn,
    tokenizer,
    *,
    k: float = 0.4,
    batch_size: int = 4,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Min-K% Prob of each text (first ``max_length`` tokens when given)."""
    seqs = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"])
        seqs.append(ids[:max_length] if max_length is not None else ids)
    lps = token_logprobs(logits_fn, seqs, _pad_id(tokenizer), batch_size=batch_size, progress=progress, desc="min-k")
    return np.array([min_k_prob(lp, k) for lp in lps])


def eval_privleak(
    forget_texts: Sequence[str],
    holdout_texts: Sequence[str],
    logits_fn: LogitsFn,
    tokenizer,
    *,
    auc_retrain: float | str | None = None,
    k: float = 0.4,
    batch_size: int = 4,
    max_length: int | None = None,
    progress: bool = True,
) -> dict:
    """Min-K% membership attack on forget vs holdout texts; PrivLeak against ``auc_retrain``
    (a number, ``"news"`` / ``"books"`` for MUSE's published retrain AUCs, or None to report
    only the AUC). Returns ``{"auc", "privleak", "forget_scores", "holdout_scores", "k"}``."""
    f = text_min_k_scores(forget_texts, logits_fn, tokenizer, k=k, batch_size=batch_size, max_length=max_length, progress=progress)
    h = text_min_k_scores(holdout_texts, logits_fn, tokenizer, k=k, batch_size=batch_size, max_length=max_length, progress=progress)
    auc = muse_auc(f, h)
    if isinstance(auc_retrain, str):
        if auc_retrain not in AUC_RETRAIN:
            raise ValueError(f"unknown MUSE corpus {auc_retrain!r} for auc_retrain; valid: {list(AUC_RETRAIN)} or a number")
        if k != 0.4:
            raise ValueError(f"MUSE's published retrain AUCs are for Min-40%; with k={k} pass auc_retrain as a number")
        auc_retrain = AUC_RETRAIN[auc_retrain]
    return {
        "auc": auc,
        "auc_retrain": auc_retrain,
        "privleak": None if auc_retrain is None else privleak(auc, float(auc_retrain)),
        "k": k,
        "forget_scores": f.tolist(),
        "holdout_scores": h.tolist(),
    }


# ----------------------------------------------------------------------------- EM / ES
def verbmem_arrays(tokenizer, items: Sequence[VerbMemItem], max_length: int = 2048,
                   pad_multiple: int = 32) -> dict[str, np.ndarray]:
    """open-unlearning's ``preprocess_pretraining_instance`` (``insert_space=True``) for each
    item, right-padded to one length: ``{input_ids, attention_mask, labels}: int32[N, T]``."""
    seqs, n_prefix = [], []
    for it in items:
        full = list(tokenizer(it.prompt + " " + it.gt, add_special_tokens=True)["input_ids"])
        k = len(tokenizer(it.prompt, add_special_tokens=True)["input_ids"])
        seqs.append(full[: k + max_length])
        n_prefix.append(max(k, 1))  # never a label on position 0
    T = int(np.ceil(max(len(x) for x in seqs) / pad_multiple) * pad_multiple)
    ids = np.full((len(seqs), T), _pad_id(tokenizer), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    labels = np.full((len(seqs), T), -100, np.int32)
    for i, (x, k) in enumerate(zip(seqs, n_prefix)):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
        labels[i, k: len(x)] = x[k:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_verbmem_memorization(
    items: Sequence[VerbMemItem],
    logits_fn: LogitsFn,
    tokenizer,
    *,
    max_length: int = 2048,
    batch_size: int = 8,
) -> dict:
    """Exact Memorization and Extraction Strength of the true continuations ``gt`` after their
    ``prompt`` (teacher forced). Returns ``{"exact_memorization", "extraction_strength", "n",
    "per_item": [{"exact_memorization", "extraction_strength"}]}``."""
    enc = verbmem_arrays(tokenizer, items, max_length)
    scores = memorization_scores(token_stats(logits_fn, enc["input_ids"], enc["attention_mask"], enc["labels"],
                                             batch_size))
    per = [{"exact_memorization": em, "extraction_strength": es}
           for em, es in zip(scores["exact_memorization"], scores["extraction_strength"])]
    return {"exact_memorization": mean_defined(scores["exact_memorization"]),
            "extraction_strength": mean_defined(scores["extraction_strength"]), "n": len(per), "per_item": per}
