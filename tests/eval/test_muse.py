"""MUSE metrics on hand-checkable cases: ROUGE-L, Min-K%, AUC, PrivLeak, VerbMem, KnowMem.

Generation goes through "oracle" GenerateFns that read the (left-padded) prompt back and
answer from a lookup table; log-probs come from a numpy bigram model.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from alter_jax.data.muse import QAItem, VerbMemItem
from alter_jax.eval.muse import (
    AUC_RETRAIN,
    cut_answer,
    eval_knowmem,
    eval_privleak,
    eval_verbmem,
    generate_texts,
    knowmem_prompt,
    min_k_prob,
    muse_auc,
    privleak,
    roc_auc,
    rouge_l,
    text_min_k_scores,
    truncate_reference,
)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = ["Question: Who wrote it?\nAnswer: Bob\n\nQuestion: Where?\nAnswer: Paris", "the cat sat on the mat"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def oracle(tok, respond, seen=None):
    """GenerateFn: decode each left-padded prompt, answer ``respond(prompt)``, then EOS + pads."""
    def fn(ids, mask, max_new_tokens):
        assert ids.dtype == np.int32 and mask.dtype == np.int32
        out = np.full((ids.shape[0], max_new_tokens), tok.pad_token_id, np.int32)
        for r in range(ids.shape[0]):
            m = mask[r].astype(bool)
            assert m[-1] and (np.diff(m.astype(int)) >= 0).all(), "prompts must be left-padded"
            prompt = tok.decode(ids[r][m], skip_special_tokens=True)
            assert ids[r][m][0] == tok.bos_token_id  # MUSE tokenises prompts with special tokens
            if seen is not None:
                seen.append(prompt)
            new = tok(respond(prompt), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            new = new[:max_new_tokens]
            out[r, :len(new)] = new
        return out
    return fn


# ----------------------------------------------------------------------------- pure formulas
def test_rouge_l_hand_values():
    s = rouge_l("the cat sat", "the cat sat on the mat")  # LCS 3: P = 3/3, R = 3/6
    assert s["precision"] == pytest.approx(1.0) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("", "anything")["f1"] == 0.0
    assert rouge_l("The Cat!", "the cat")["f1"] == pytest.approx(1.0)  # rouge_score lower-cases, drops punctuation


def test_min_k_prob_known_values():
    lp = np.array([-1.0, -5.0, -2.0, -4.0, -3.0])
    assert min_k_prob(lp, 0.4) == pytest.approx(-4.5)  # floor(0.4 * 5) = 2 lowest: -5, -4
    assert min_k_prob(lp, 0.1) == pytest.approx(-5.0)  # floor(0.5) = 0 -> at least one token
    assert min_k_prob(lp, 1.0) == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        min_k_prob(np.zeros(0))
    with pytest.raises(ValueError):
        min_k_prob(lp, 0.0)


def test_roc_auc_known_values_and_brute_force():
    # pairs (pos, neg): 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4
    assert roc_auc([3, 2], [1, 2]) == pytest.approx(0.875)
    assert roc_auc([1, 1], [1]) == pytest.approx(0.5)
    assert roc_auc([0], [1, 2]) == 0.0
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 7).astype(float), rng.integers(0, 5, 9).astype(float)
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert roc_auc(pos, neg) == pytest.approx(brute)


def test_muse_auc_orientation_and_privleak():
    memorised_forget, holdout = [-0.1, -0.2, -0.3], [-2.0, -3.0, -2.5]  # forget far more likely
    assert muse_auc(memorised_forget, holdout) == 0.0  # target-model-like: MUSE reports ~0
    assert muse_auc(holdout, memorised_forget) == 1.0
    assert privleak(0.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.6, 0.5) == pytest.approx(20.0)
    assert privleak(AUC_RETRAIN["news"], AUC_RETRAIN["news"]) == 0.0
    with pytest.raises(ValueError):
        privleak(0.5, 0.0)


def test_knowmem_prompt_and_cut():
    icl = [QAItem("Q1?", "A1"), QAItem("Q2?", "A2")]
    assert knowmem_prompt("Who?", icl) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Who?\nAnswer: "
    assert knowmem_prompt("Who?") == "Question: Who?\nAnswer: "
    assert cut_answer("Bob\n\nQuestion: x") == "Bob"
    assert cut_answer("Bob\nQuestion: x") == "Bob"
    assert cut_answer("Bob Question: x") == "Bob "
    assert cut_answer("Bob and Alice") == "Bob and Alice"


# ----------------------------------------------------------------------------- with a tokenizer
def test_generate_texts_left_pads_and_cuts_at_eos(tok):
    seen = []
    prompts = ["the cat", "the cat sat on the mat and the", "Question"]
    outs = generate_texts(oracle(tok, lambda p: " <" + p[-3:] + ">", seen), tok, prompts, 8,
                          batch_size=2, pad_multiple=4, progress=False)
    assert outs == [" <" + p[-3:] + ">" for p in prompts]
    assert set(prompts) <= set(seen)


def test_knowmem_oracle(tok):
    answers = {"Who wrote it?": "Bob", "Where?": "Paris", "When?": "never"}
    items = [QAItem("Who wrote it?", "Bob"), QAItem("Where?", "Paris"), QAItem("When?", "in 1999")]
    icl = [QAItem("Q0?", "A0")]

    def respond(prompt):
        assert prompt.startswith("Question: Q0?\nAnswer: A0\n\n")
        q = prompt.rsplit("Question: ", 1)[1].split("\nAnswer: ")[0]
        return answers[q] + "\n\nQuestion: more"

    res = eval_knowmem(items, oracle(tok, respond), tok, icl, max_new_tokens=32, batch_size=2, progress=False)
    assert [p["output"] for p in res["per_item"]] == ["Bob", "Paris", "never"]
    assert res["knowmem"] == pytest.approx((1 + 1 + 0) / 3)
    assert res["n"] == 3


def test_verbmem_reference_truncation_and_score(tok):
    gt = " the cat sat on the mat"
    ids = tok(gt, add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) > 4
    ref = truncate_reference(tok, gt, 4)  # BOS counts as one of the 4, as in MUSE
    assert ref == tok.decode(ids[1:4])
    # the oracle continues with the full ground truth: its first 4 generated tokens are kept
    res = eval_verbmem([VerbMemItem("once", gt)], oracle(tok, lambda p: gt), tok, max_new_tokens=4, progress=False)
    out = res["per_item"][0]["output"]
    assert out == tok.decode(tok(gt, add_special_tokens=False)["input_ids"][:4])
    assert res["verbmem"] == pytest.approx(rouge_l(out, ref)["f1"])
    assert res["rougeL_recall"] == pytest.approx(1.0)  # the reference (3 tokens) is inside the output (4 tokens)
    res = eval_verbmem([VerbMemItem("once", gt)], oracle(tok, lambda p: "dog dog"), tok, max_new_tokens=4, progress=False)
    assert res["verbmem"] == 0.0


def bigram_fn(table):
    return lambda ids, mask: table[ids]


def test_min_k_scores_and_privleak_with_bigram_model(tok):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(tok), len(tok))) * 2
    forget = ["the cat sat on the mat", "the mat", "Question: Who wrote it?"]
    holdout = ["Answer: Paris", "the cat", "Where? Bob wrote it on the mat"]

    def hand(text):
        ids = tok(text)["input_ids"]
        lp = []
        for a, b in zip(ids[:-1], ids[1:]):
            row = table[a] - table[a].max()
            lp.append(row[b] - np.log(np.exp(row).sum()))
        lp = np.sort(lp)
        return lp[: max(1, int(0.4 * len(lp)))].mean()

    got = text_min_k_scores(forget, bigram_fn(table), tok, batch_size=2, progress=False)
    np.testing.assert_allclose(got, [hand(t) for t in forget], rtol=1e-6)
    res = eval_privleak(forget, holdout, bigram_fn(table), tok, auc_retrain="news", batch_size=2, progress=False)
    auc = roc_auc([hand(t) for t in holdout], [hand(t) for t in forget])
    assert res["auc"] == pytest.approx(auc)
    assert res["privleak"] == pytest.approx((auc - 0.4772) / 0.4772 * 100)
    assert eval_privleak(forget, holdout, bigram_fn(table), tok, progress=False)["privleak"] is None
    with pytest.raises(ValueError, match="Min-40%"):
        eval_privleak(forget, holdout, bigram_fn(table), tok, auc_retrain="news", k=0.2, progress=False)
