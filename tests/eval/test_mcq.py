"""MCQ scoring: exact prompt, harness tokenisation, batching independence, accuracies.

The model is a numpy bigram table (logits[b, t] = W[ids[b, t]]), so every option's
log-likelihood can be written down by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from alter_jax.data.mcq import MCQItem
from alter_jax.eval.mcq import accuracy_report, build_rows, encode_pair, evaluate_mcq, format_question, mcq_context


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The following are multiple choice questions (with answers) about biology.",
              "What is the answer?\nA. one\nB. two\nC. three\nD. four\nAnswer:",
              " A B C D" * 10] * 20  # frequent " A".." D": each letter continuation is one token
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def bigram_fn(table: np.ndarray):
    def fn(ids, mask):
        assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
        return table[ids]
    return fn


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


ITEMS = [
    MCQItem("  What is the answer? ", ("one", "two", "three", "four"), 0, "wmdp-bio"),
    MCQItem("Pick one", ("a", "b", "c", "d"), 2, "wmdp-bio"),
    MCQItem("Which number?", ("1", "2", "3", "4"), 3, "college_biology"),
    MCQItem("Last one", ("w", "x", "y", "z"), 1, ""),
]


def test_prompt_is_harness_template():
    item = ITEMS[0]
    assert format_question(item) == "What is the answer?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
    assert mcq_context(item) == (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        "What is the answer?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
    )
    assert mcq_context(ITEMS[2]).startswith("The following are multiple choice questions (with answers) about college biology.\n\n")
    assert mcq_context(ITEMS[3]) == format_question(ITEMS[3])  # no subject -> no description
    assert mcq_context(item, description=False) == format_question(item)
    assert mcq_context(item, description="X\n") == "X\n" + format_question(item)


def test_encode_pair_tail_and_trailing_space(tok):
    ctx, cont = encode_pair(tok, "Answer:", " A")
    whole = tok("Answer: A", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole and ctx == tok("Answer:", add_special_tokens=False)["input_ids"]
    # a trailing space on the context moves onto the continuation
    ctx2, cont2 = encode_pair(tok, "Answer: ", "A")
    assert (ctx2, cont2) == (ctx, cont)
    ctx3, _ = encode_pair(tok, "Answer:", " A", add_special_tokens=True)
    assert ctx3[0] == tok.bos_token_id


def hand_loglik(tok, item, table, add_special_tokens=False):
    """Independent per-option sum log p under the bigram model."""
    context = mcq_context(item)
    out = []
    for letter in "ABCD":
        ctx = tok(context, add_special_tokens=add_special_tokens)["input_ids"]
        whole = tok(context + " " + letter, add_special_tokens=add_special_tokens)["input_ids"]
        cont = whole[len(ctx):]
        seq = ctx + cont
        s = 0.0
        for j in range(len(ctx), len(seq)):
            s += log_softmax(table[seq[j - 1]])[seq[j]]
        out.append(s)
    return np.array(out)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_loglik_matches_hand_computation_and_batching(tok, add_special_tokens):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(tok), len(tok))).astype(np.float32)
    expected = np.stack([hand_loglik(tok, it, table, add_special_tokens) for it in ITEMS])
    results = [
        evaluate_mcq(ITEMS, bigram_fn(table), tok, batch_size=bs, add_special_tokens=add_special_tokens,
                     pad_multiple=pm, progress=False)
        for bs, pm in [(1, 1), (3, 8), (16, 32)]
    ]
    for r in results:
        np.testing.assert_allclose(r.loglik, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(r.predictions, expected.argmax(-1))
        assert r.accuracy == pytest.approx(np.mean(expected.argmax(-1) == [it.answer for it in ITEMS]))


def test_multi_token_continuations_use_one_row_per_option(tok):
    # the tiny BPE has " A" as one token; SplitTok below forces 2-token options
    ctx, cont = encode_pair(tok, "Answer:", " A")
    assert len(cont) == 1
    rows = build_rows(ITEMS[:1], tok)
    assert len(rows) == 1 and len(rows[0].targets) == 4  # single-token letters share one row

    class SplitTok:
        """Wraps the tokenizer and splits every space into its own token (id 3)."""
        pad_token_id, eos_token_id = 0, 2

        def __call__(self, text, add_special_tokens=False):
            ids = []
            for k, part in enumerate(text.split(" ")):
                if k:
                    ids.append(3)
                if part:
                    ids += tok(part, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids}

    st = SplitTok()
    rows = build_rows(ITEMS[:1], st)
    assert len(rows) == 4 and all(len(r.targets[0][2]) == 2 for r in rows)
    rng = np.random.default_rng(1)
    table = rng.normal(size=(len(tok), len(tok))).astype(np.float32)
    res = evaluate_mcq(ITEMS[:1], bigram_fn(table), st, batch_size=2, progress=False)
    context = mcq_context(ITEMS[0])
    ctx_ids = st(context)["input_ids"]
    for oi, letter in enumerate("ABCD"):
        seq = ctx_ids + [3] + tok(letter, add_special_tokens=False)["input_ids"]
        want = sum(log_softmax(table[seq[j - 1]])[seq[j]] for j in range(len(ctx_ids), len(seq)))
        assert res.loglik[0, oi] == pytest.approx(want, rel=1e-6)


def test_accuracy_report_micro_and_macro():
    ll = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [5, 5, 0, 0]], float)
    answers = [1, 1, 2, 0, 0]
    subjects = ["s1", "s1", "s2", "s2", "s2"]
    r = accuracy_report(ll, answers, subjects)
    np.testing.assert_array_equal(r.predictions, [1, 0, 2, 3, 0])  # tie -> first index
    assert r.per_subject == {"s1": 0.5, "s2": pytest.approx(2 / 3)}
    assert r.counts == {"s1": 2, "s2": 3}
    assert r.accuracy == pytest.approx(3 / 5)
    assert r.macro_accuracy == pytest.approx((0.5 + 2 / 3) / 2)
    d = r.to_dict()
    assert d["n"] == 5 and d["accuracy"] == pytest.approx(0.6)


def test_bad_logits_shape_is_reported(tok):
    with pytest.raises(ValueError, match="expected \\[B, T, V\\]"):
        evaluate_mcq(ITEMS[:1], lambda ids, mask: np.zeros((1, 2, 3)), tok, progress=False)
