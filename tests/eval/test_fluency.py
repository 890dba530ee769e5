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
    # float32 log-sum-exp on the device (models' logits are float32): equal to float64 within 1e-6
    np.testing.assert_allclose(lps[0], [lsm[1, 5], lsm[5, 6], lsm[6, 7]], rtol=1e-6)
    np.testing.assert_allclose(lps[1], [lsm[1, 9]], rtol=1e-6)
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


# ----------------------------------------------------------------------------- degenerate answers (Eq. F4)
from alter_jax.eval.fluency import degenerate_rate, degenerate_reason, is_degenerate, longest_run  # noqa: E402


def test_longest_run():
    assert longest_run([]) == 0 and longest_run("a") == 1 and longest_run("abba") == 2
    assert longest_run(["x", "x", "y", "x", "x", "x"]) == 3


@pytest.mark.parametrize("text, reason", [
    ("", "empty"), ("   \n ", "empty"),
    (".....", "no_letters"), ("............... ", "no_letters"), ("1987 , 42 !", "no_letters"),
    ("gothic gothic gothic gothic", "token_run"),
    ("Gothic, gothic gothic. gothic!", "token_run"),  # case and surrounding punctuation ignored
    ("the the the cat", "token_run"),  # run of 3 > 4 / 2
    ("KKKKKKKK", "char_run"), ("Ign.............", "char_run"),  # 13 of 16 characters are '.'
    ("Paris Paris", "token_run"),  # a run of 2 covers 2 of 2 tokens
])
def test_degenerate_answers(text, reason):
    assert degenerate_reason(text) == reason and is_degenerate(text)


@pytest.mark.parametrize("text", [
    "The author was born in Paris in 1952.",
    "Paris.", "Yes", "I",  # one-word answers: a run of length 1 never counts
    "She wrote 'The Silent River' and 'The Silent Sea'.",  # repeated words, but no run covers half
    "Hmm, hmm, I am not sure about that one.",  # a run of 2 of 9 tokens
])
def test_normal_answers_are_not_degenerate(text):
    assert degenerate_reason(text) is None and not is_degenerate(text)


def test_degenerate_edge_cases():
    # exactly half is not "more than half"
    assert degenerate_reason("no no yes maybe") is None  # run 2 of 4 tokens
    assert degenerate_reason("aabb") is None  # char run 2 of 4
    assert degenerate_reason("aab") == "char_run"  # 2 of 3 characters
    # whitespace does not count as a character: 'a a a' has char runs of 1, token run of 3
    assert degenerate_reason("a a a") == "token_run"
    # a letter anywhere rescues (b), not (d)
    assert degenerate_reason("x" + "." * 10) == "char_run"
    assert degenerate_rate(["", "A normal sentence here.", ".....", "Fine."]) == pytest.approx(0.5)
    assert np.isnan(degenerate_rate([]))


def test_report_has_degenerate_rate():
    r = fluency_report(["....", "A normal sentence.", "la la la la la"])
    assert r["per_answer"]["degenerate"] == [1.0, 0.0, 1.0]
    assert r["summary"]["degenerate"]["mean"] == pytest.approx(2 / 3)


def test_continuation_perplexity_by_hand():
    from alter_jax.eval.fluency import continuation_perplexities

    rng = np.random.default_rng(1)
    table = rng.normal(size=(30, 30))
    fn = lambda ids, mask: table[ids]  # noqa: E731
    lsm = table - np.log(np.exp(table).sum(-1, keepdims=True))
    ppl = continuation_perplexities(fn, [[1, 3], [1], [2, 2]], [[4, 5, 6], [7], []], pad_id=0, batch_size=2)
    np.testing.assert_allclose(ppl[0], np.exp(-np.mean([lsm[3, 4], lsm[4, 5], lsm[5, 6]])))
    np.testing.assert_allclose(ppl[1], np.exp(-lsm[1, 7]))
    assert np.isnan(ppl[2])
    with pytest.raises(ValueError, match="prefixes"):
        continuation_perplexities(fn, [[1]], [], pad_id=0)


def test_tofu_split_fluency_on_a_tiny_model():
    """Acceptance (issue 19): on the demo's tiny Llama, the TOFU split log carries per-row
    degenerate / rep_4 / distinct / generated_ppl as defined, and the split summary their means.
    The "generator" replays fixed answers (a garbage one and a sentence), so the expected values
    are known; generated_ppl is checked against the model's own logits on prompt + answer."""
    from alter_jax.data.prompts import encode_prompt
    from alter_jax.demo import ensure_demo_model
    from alter_jax.eval.tofu import evaluate_split, split_metrics
    from alter_jax.generate import model_fns
    from alter_jax.io.hf import load_pretrained, load_tokenizer

    folder = ensure_demo_model(progress=False, log=lambda *_: None)
    tok, model = load_tokenizer(folder), load_pretrained(folder)
    logits_fn, _ = model_fns(model)
    answers = ["...............", "The author was born in a small town.", "the the the the the book"]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    n_new = max(len(i) for i in ids) + 1

    def replay(batch_ids, mask, max_new):  # row r of the batch answers answers[r] (then EOS, then padding)
        out = np.full((batch_ids.shape[0], max_new), tok.pad_token_id, np.int64)
        for r in range(min(len(ids), len(out))):
            row = ids[r] + [tok.eos_token_id]
            out[r, :len(row)] = row[:max_new]
        return out

    rows = [{"question": f"Question {k} about the author?", "answer": "An answer.", "paraphrased_answer": "A reply.",
             "perturbed_answer": ["Wrong.", "Also wrong."]} for k in range(3)]
    log = evaluate_split(rows, "eval_log_forget", logits_fn=logits_fn, generate_fn=replay, tokenizer=tok,
                         fmt="llama2", max_length=96, batch_size=4, max_new_tokens=n_new, ppl_logits_fn=logits_fn)
    gens = [log["generated_text"][str(k)][1] for k in range(3)]
    assert [is_degenerate(g) for g in gens] == [True, False, True]
    assert [log["degenerate"][str(k)] for k in range(3)] == [1.0, 0.0, 1.0]
    assert [log["rep_4"][str(k)] for k in range(3)] == pytest.approx([repetition_rate(g, 4) for g in gens])
    assert log["rep_4"]["2"] == pytest.approx(1 - 2 / 3)  # 6 words, 3 four-grams, 2 unique
    # generated_ppl: the backbone scores prompt + generated ids, perplexity over the generated ids
    for k in range(3):
        prompt = list(encode_prompt(tok, rows[k]["question"], "llama2"))
        seq = np.asarray([prompt + ids[k]], np.int32)
        lg = np.asarray(logits_fn(seq, np.ones_like(seq)), np.float64)[0]
        lsm = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        lp = [lsm[len(prompt) - 1 + t, ids[k][t]] for t in range(len(ids[k]))]
        assert log["generated_ppl"][str(k)] == pytest.approx(float(np.exp(-np.mean(lp))), rel=1e-4)
    m = split_metrics(log, "eval_log_forget")
    assert m["degenerate_rate"] == pytest.approx(2 / 3)
    assert m["rep_4"] == pytest.approx(np.mean([repetition_rate(g, 4) for g in gens]))
    assert m["generated_ppl"] == pytest.approx(np.mean([log["generated_ppl"][str(k)] for k in range(3)]))


def test_fluency_round_trips_through_tofu_eval_json():
    from alter_jax.eval.tofu import logs_from_tofu_eval, split_metrics, tofu_eval_from_logs

    def keyed(v):
        return {str(i): x for i, x in enumerate(v)}

    log = {"avg_gt_loss": keyed([1.0, 2.0]), "average_perturb_loss": keyed([[2.0, 3.0], [2.5, 3.5]]),
           "avg_paraphrased_loss": keyed([1.5, 1.0]), "rougeL_recall": keyed([0.5, 0.2]),
           "rouge1_recall": keyed([0.6, 0.3]), "degenerate": keyed([1.0, 0.0]), "rep_4": keyed([0.5, 0.0]),
           "distinct_1": keyed([0.2, 1.0]), "distinct_2": keyed([0.1, 1.0]), "generated_ppl": keyed([None, 3.0])}
    ou = tofu_eval_from_logs({"eval_log_forget": log})
    assert ou["forget_fluency"]["agg_value"] == 0.5
    back = logs_from_tofu_eval(ou)["eval_log_forget.json"]
    a, b = split_metrics(log, "eval_log_forget"), split_metrics(back, "eval_log_forget")
    for k in ("degenerate_rate", "rep_4", "distinct_1", "distinct_2", "generated_ppl", "generated_ppl_median"):
        assert a[k] == b[k], k
    assert a["generated_ppl"] == 3.0 and a["degenerate_rate"] == 0.5
