"""Generation-quality proxies: reference perplexity, repetition, distinct-n; mean and variance.

The ALTER paper scores fluency with GPT-4o (Flu-mean / Flu-var over answers). Offline we
report cheap, reproducible proxies, each per answer, then its mean and (population,
``ddof=0``) variance over answers:

- ``ppl``: perplexity of the answer under a reference (backbone) model,
  ``exp(-(1/N) sum_t log p_ref(a_t | prompt, a_<t))`` over the N answer tokens (Eq. F1);
- ``rep_n``: repeated n-gram rate, ``1 - |unique n-grams| / |n-grams|`` (Welleck et al.
  2020 "seq-rep-n", default n = 4): the share of n-gram occurrences that repeat an earlier
  n-gram of the same answer (Eq. F2); 0 when the answer has fewer than n words;
- ``distinct_n``: ``|unique n-grams| / |n-grams|`` (Li et al. 2016) for n = 1, 2 (Eq. F3);
  0 for an answer with no n-gram.

- ``degenerate``: 1 if the answer is visibly broken (Eq. F4, :func:`degenerate_reason`), else 0;
  its mean over answers is the degenerate-answer rate.

Words for rep/distinct are ``re.findall(r"\\w+|[^\\w\\s]", text.lower())`` (lower-cased words and
single punctuation marks), so the numbers do not depend on a model's tokenizer.

Degenerate answers (Eq. F4, docs/eval_definitions.md). After ``strip()``, an answer is degenerate
if it is (a) empty, (b) has no letter (no character with ``str.isalpha``), (c) one run of the same
*whitespace token* repeated back to back (length ≥ 2) covers more than half of its whitespace
tokens, or (d) one run of the same *character* (length ≥ 2, whitespace not counted) covers more
than half of its non-whitespace characters. Whitespace tokens are ``text.split()``, compared after
``lower()`` and stripping surrounding ASCII punctuation (a token that is only punctuation is kept
as it is). Tokens are whitespace tokens, not a tokenizer's: the rate must compare models with
different tokenizers, and a BPE vocabulary may hold ``"................"`` as one token; character
runs catch what whitespace tokens cannot (``KKKKKKKK``, ``Ign.............``). Runs of length 1 never
count, so a one-word answer (``Paris.``) is not degenerate.
"""

from __future__ import annotations

import re
import string
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from alter_jax.data.batching import length_sorted_batches

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word / punctuation tokens used by the n-gram proxies."""
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(text: str, n: int = 4) -> float:
    """Eq. F2: ``1 - |unique n-grams| / |n-grams|`` of ``text`` (0.0 if no n-gram)."""
    grams = ngrams(words(text), n)
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def distinct_n(text: str, n: int) -> float:
    """Eq. F3: ``|unique n-grams| / |n-grams|`` of ``text`` (0.0 if no n-gram)."""
    grams = ngrams(words(text), n)
    return 0.0 if not grams else len(set(grams)) / len(grams)


def _norm_token(tok: str) -> str:
    return tok.lower().strip(string.punctuation) or tok


def longest_run(items: Sequence) -> int:
    """Length of the longest run of equal consecutive items (0 for an empty sequence)."""
    best = cur = 0
    prev = object()
    for x in items:
        cur = cur + 1 if x == prev else 1
        prev = x
        best = max(best, cur)
    return best


def degenerate_reason(text: str) -> str | None:
    """Eq. F4: why ``text`` is a degenerate answer — ``"empty"``, ``"no_letters"``, ``"token_run"``
    or ``"char_run"`` (first that applies, in that order) — or None when it is not (module
    docstring: whitespace tokens, runs of length ≥ 2 covering more than half)."""
    t = text.strip()
    if not t:
        return "empty"
    if not any(c.isalpha() for c in t):
        return "no_letters"
    toks = [_norm_token(w) for w in t.split()]
    run = longest_run(toks)
    if run >= 2 and run > len(toks) / 2:
        return "token_run"
    chars = [c for c in t if not c.isspace()]
    run = longest_run(chars)
    if run >= 2 and run > len(chars) / 2:
        return "char_run"
    return None


def is_degenerate(text: str) -> bool:
    """Eq. F4 as a boolean (:func:`degenerate_reason` is not None)."""
    return degenerate_reason(text) is not None


def degenerate_rate(answers: Sequence[str]) -> float:
    """Share of degenerate answers (Eq. F4); NaN for no answer."""
    return float(np.mean([is_degenerate(a) for a in answers])) if len(answers) else float("nan")


def token_logprobs(
    logits_fn: LogitsFn,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    pad_multiple: int = 32,
    progress: bool = False,
    desc: str = "logprobs",
) -> list[np.ndarray]:
    """Per-token log-probabilities ``log p(x_t | x_<t)``, t = 1..len-1, of every sequence.

    Returns one float64 array of length ``len(seq) - 1`` per sequence. Batches are
    right-padded to the static shape ``[batch_size, ceil(T / pad_multiple) * pad_multiple]``
    (short batches filled with copies of their first row)."""
    out: list[np.ndarray | None] = [None] * len(sequences)
    n_batches = (len(sequences) + batch_size - 1) // batch_size
    batches = length_sorted_batches(sequences, batch_size, pad_id, pad_multiple)
    for idx, ids, mask in tqdm(batches, total=n_batches, desc=desc, disable=not progress):
        logits = logits_fn(ids, mask)
        if np.ndim(logits) != 3 or tuple(np.shape(logits)[:2]) != ids.shape:
            raise ValueError(f"LogitsFn returned shape {np.shape(logits)}; expected [B, T, V] with B, T = {ids.shape}")
        lp = _next_token_logprobs(logits, ids)  # [B, T - 1]: only these leave the device, not [B, T, V]
        for r, i in enumerate(idx):
            n = len(sequences[i])
            out[i] = lp[r, : n - 1] if n >= 2 else np.zeros((0,), np.float64)
    return out  # type: ignore[return-value]


_TARGET_LOGPROBS = None


def _next_token_logprobs(logits, ids: np.ndarray) -> np.ndarray:
    """``log_softmax(logits[:, t])[ids[:, t + 1]]`` for t < T − 1, computed where the logits are (jitted,
    float32 log-sum-exp) -> ``float64[B, T − 1]``."""
    global _TARGET_LOGPROBS
    if _TARGET_LOGPROBS is None:
        import jax
        import jax.numpy as jnp

        def f(x, tgt):
            x = x[:, :-1].astype(jnp.float32)
            picked = jnp.take_along_axis(x, tgt[:, 1:, None], axis=-1)[..., 0]
            return picked - jax.nn.logsumexp(x, axis=-1)

        _TARGET_LOGPROBS = jax.jit(f)
    return np.asarray(_TARGET_LOGPROBS(logits, np.asarray(ids, np.int32)), np.float64)


def answer_perplexities(
    logits_fn: LogitsFn,
    tokenizer,
    answers: Sequence[str],
    prompts: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Eq. F1 per answer: the sequence is ``tok(prompt, add_special_tokens=True) +
    tok(answer, add_special_tokens=False)`` (just BOS + answer without prompts); only the
    answer tokens are scored. ``max_length`` keeps the last tokens. NaN for an empty answer."""
    if prompts is not None and len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
    ctxs, anss = [], []
    for k, answer in enumerate(answers):
        if prompts is not None:
            ctxs.append(list(tokenizer(prompts[k], add_special_tokens=True)["input_ids"]))
        else:
            ctxs.append([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        anss.append(list(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return continuation_perplexities(logits_fn, ctxs, anss, pad_id, batch_size=batch_size, max_length=max_length,
                                     progress=progress)


def continuation_perplexities(
    logits_fn: LogitsFn,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Eq. F1 on token ids: ``exp(−mean_t log p(c_t | prefix, c_<t))`` over the continuation's
    tokens, the model scoring ``prefix + continuation`` (e.g. the prompt ids a model generated
    after and the ids it generated, cut at EOS). ``max_length`` keeps the last tokens.
    Returns ``float64[N]``; NaN for an empty continuation."""
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes for {len(continuations)} continuations")
    seqs, n_cont = [], []
    for pre, cont in zip(prefixes, continuations):
        seq = list(pre) + list(cont)
        if max_length is not None:
            seq = seq[-max_length:]
        seqs.append(seq)
        n_cont.append(min(len(cont), max(len(seq) - 1, 0)))
    lps = token_logprobs(logits_fn, seqs, pad_id, batch_size=batch_size, progress=progress, desc="ppl")
    out = np.full(len(seqs), np.nan)
    for k, (lp, n) in enumerate(zip(lps, n_cont)):
        if n > 0:
            out[k] = float(np.exp(-lp[-n:].mean()))
    return out


def answer_fluency(answers: Sequence[str], rep_n: int = 4) -> dict[str, np.ndarray]:
    """The text-only proxies per answer: ``degenerate`` (0/1, Eq. F4), ``rep_<n>`` (F2),
    ``distinct_1`` / ``distinct_2`` (F3); each ``float64[N]``."""
    return {
        "degenerate": np.array([float(is_degenerate(a)) for a in answers], np.float64),
        f"rep_{rep_n}": np.array([repetition_rate(a, rep_n) for a in answers], np.float64),
        "distinct_1": np.array([distinct_n(a, 1) for a in answers], np.float64),
        "distinct_2": np.array([distinct_n(a, 2) for a in answers], np.float64),
    }


def finite_mean(values) -> float | None:
    """Mean of the finite entries (None when there is none): a perplexity summary that skips the
    empty answers."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "var": float("nan")}
    return {"mean": float(v.mean()), "var": float(v.var())}


def fluency_report(
    answers: Sequence[str],
    prompts: Sequence[str] | None = None,
    *,
    logits_fn: LogitsFn | None = None,
    tokenizer=None,
    rep_n: int = 4,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict:
    """Per-answer proxies and their mean / variance over answers.

    Returns ``{"summary": {metric: {"mean", "var"}}, "per_answer": {metric: list}}`` with
    metrics ``degenerate`` (its mean is the degenerate-answer rate), ``rep_<n>``, ``distinct_1``,
    ``distinct_2`` and, when ``logits_fn`` and ``tokenizer`` are given, ``ppl`` (answers with no
    token are left out of its summary)."""
    per = answer_fluency(answers, rep_n)
    if logits_fn is not None:
        if tokenizer is None:
            raise ValueError("fluency_report: perplexity needs the tokenizer of the reference model")
        per["ppl"] = answer_perplexities(logits_fn, tokenizer, answers, prompts, batch_size, max_length)
    return {
        "summary": {k: _summary(v) for k, v in per.items()},
        "per_answer": {k: v.tolist() for k, v in per.items()},
    }
