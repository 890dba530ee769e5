"""Fluency proxies on hand-made strings and a bigram reference model."""

from __future__ import annotations

import numpy as np
import pytest

from alter_jax.eval.fluency import (
    answer_perplexities,
    distinct_n,
    fluency_report,
    repetition_rate,
    token_logprobs,
    words,
)


def test_words_and_ngram_proxies_by_hand():
    assert words("The cat, the CAT.") == ["the", "cat", ",", "the", "cat", "."]
    text = "a b a b a b"  # 6 words
    # 4-grams: (a b a b), (b a b a), (a b a b) -> 3 grams, 2 unique
    assert repetition_rate(text, 4) == pytest.approx(1 - 2 / 3)
    # 2-grams: ab ba ab ba ab -> 5 grams, 2 unique
    assert repetition_rate(text, 2) == pytest.approx(1 - 2 / 5)
    assert distinct_n(text, 1) == pytest.approx(2 / 6)
    assert distinct_n(text, 2) == pytest.approx(2 / 5)
    fresh = "one two three four five"
    assert repetition_rate(fresh, 4) == 0.0 and distinct_n(fresh, 1) == 1.0 and distinct_n(fresh, 2) == 1.0
    assert repetition_rate("too short", 4) == 0.0 and distinct_n("", 1) == 0.0
    assert repetition_rate("x x x x x x x x", 4) == pytest.approx(1 - 1 / 5)


def test_report_mean_and_population_variance():
    answers = ["a b a b a b", "one two three four five", "x x x x x x x x"]
    rep = [1 - 2 / 3, 0.0, 1 - 1 / 5]
    d1 = [2 / 6, 1.0, 1 / 8]
    r = fluency_report(answers)
    assert r["per_answer"]["rep_4"] == pytest.approx(rep)
    assert r["summary"]["rep_4"]["mean"] == pytest.approx(np.mean(rep))
    assert r["summary"]["rep_4"]["var"] == pytest.approx(np.var(rep))  # ddof = 0
    assert r["summary"]["distinct_1"]["mean"] == pytest.approx(np.mean(d1))
    assert "ppl" not in r["summary"]
    with pytest.raises(ValueError, match="tokenizer"):
        fluency_report(answers, logits_fn=lambda i, m: None)


class CharTok:
    """One token per character ('a'..'z' -> 3..28, ' ' -> 29); BOS = 1, pad = 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [29 if c == " " else 3 + ord(c) - ord("a") for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_token_logprobs_and_perplexity_by_hand():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, 30))
    fn = lambda ids, mask: table[ids]  # noqa: E731  bigram model
    lsm = table - np.log(np.exp(table).sum(-1, keepdims=True))

    seqs = [[1, 5, 6, 7], [1, 9], [4]]
    lps = token_logprobs(fn, seqs, pad_id=0, batch_size=2, pad_multiple=4)
    np.testing.assert_allclose(lps[0], [lsm[1, 5], lsm[5, 6], lsm[6, 7]])
    np.testing.assert_allclose(lps[1], [lsm[1, 9]])
    assert lps[2].shape == (0,)

    tok = CharTok()
    # with a prompt: only the answer tokens count
    ppl = answer_perplexities(fn, tok, ["bc", "z"], prompts=["a", "ab"])
    b, c, a, z = 4, 5, 3, 28
    want0 = np.exp(-np.mean([lsm[a, b], lsm[b, c]]))
    want1 = np.exp(-lsm[b, z])
    np.testing.assert_allclose(ppl, [want0, want1], rtol=1e-6)
    # without prompts: BOS + answer
    ppl = answer_perplexities(fn, tok, ["bc", ""])
    assert ppl[0] == pytest.approx(np.exp(-np.mean([lsm[1, b], lsm[b, c]])))
    assert np.isnan(ppl[1])
    r = fluency_report(["bc", ""], logits_fn=fn, tokenizer=tok)
    assert r["summary"]["ppl"]["mean"] == pytest.approx(ppl[0]) and r["summary"]["ppl"]["var"] == 0.0
