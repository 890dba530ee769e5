"""Prompt formats and label masking on a Llama-2 style and a ChatML tokenizer (offline)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from alter_jax.data.prompts import (
    FORMATS,
    IGNORE_INDEX,
    encode_prompt,
    encode_qa,
    encode_qa_batch,
    left_pad,
    prompt_text,
    resolve_format,
)
from alter_jax.data.synthetic import generate_authors, train_toy_tokenizer

ROWS = generate_authors(3, seed=0)
QA = [(r["question"], r["answer"]) for r in ROWS[:12]]
CORPUS = [f"[INST] {q} [/INST]{a} Question: {q}\nAnswer: {a}" for q, a in QA] + [r["paraphrased_answer"] for r in ROWS]


@pytest.fixture(scope="module")
def llama_tok():
    return train_toy_tokenizer(CORPUS, kind="llama2", vocab_size=400)


@pytest.fixture(scope="module")
def chatml_tok():
    return train_toy_tokenizer(CORPUS, kind="chatml", vocab_size=400)


def _check_masking(tok, fmt, question, answer, max_length=128):
    enc = encode_qa(tok, question, answer, fmt, max_length)
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == np.int32
    assert ids.shape == mask.shape == labels.shape == (max_length,)
    prompt_ids = encode_prompt(tok, question, fmt)
    n_prompt = len(prompt_ids)
    n = int(mask.sum())
    # prompt masked, then every real token scored, padding masked
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert (labels[n_prompt:n] == ids[n_prompt:n]).all()
    assert (labels[n:] == IGNORE_INDEX).all() and (mask[n:] == 0).all() and (mask[:n] == 1).all()
    # the prompt tokenises the same alone and inside the full sequence
    assert ids[:n_prompt].tolist() == prompt_ids
    # the scored tokens are exactly the answer (+ EOS): first unmasked label is the answer's first token
    scored = labels[labels != IGNORE_INDEX].tolist()
    assert scored[-1] == tok.eos_token_id
    assert tok.decode(scored[:-1], skip_special_tokens=True).strip() == answer
    first = tok.decode([scored[0]]).strip()
    assert first and answer.startswith(first), (first, answer)
    return enc, n_prompt


def test_llama2_masking(llama_tok):
    q, a = QA[0]
    text, special = prompt_text(llama_tok, q, "llama2")
    assert text == f"[INST] {q} [/INST]" and special
    enc, n_prompt = _check_masking(llama_tok, "llama2", q, a)
    assert enc["input_ids"][0] == llama_tok.bos_token_id
    for q, a in QA[1:6]:
        _check_masking(llama_tok, "llama2", q, a)


def test_plain_masking_both_tokenizers(llama_tok, chatml_tok):
    for q, a in QA[:4]:
        _check_masking(llama_tok, "plain", q, a)
        _check_masking(chatml_tok, "plain", q, a)


def test_chatml_masking(chatml_tok):
    q, a = QA[0]
    text, special = prompt_text(chatml_tok, q, "auto")
    assert text == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" and not special
    assert resolve_format("auto", chatml_tok).name == "chat"
    for q, a in QA[:6]:
        enc, n_prompt = _check_masking(chatml_tok, "auto", q, a)
        # the token just before the answer is the newline after "assistant"
        assert chatml_tok.decode([int(enc["input_ids"][n_prompt - 1])]) == "\n"
    # chatml fallback template on a tokenizer without one gives the same prompt
    assert resolve_format("auto", llama_tok_no_template := _no_template(chatml_tok)).name == "plain"
    assert prompt_text(llama_tok_no_template, q, "chatml")[0] == prompt_text(chatml_tok, q, "auto")[0]


def _no_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_no_boundary_warning(llama_tok, chatml_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fmt, tok in (("llama2", llama_tok), ("plain", llama_tok), ("chatml", chatml_tok), ("plain", chatml_tok)):
            for q, a in QA:
                encode_qa(tok, q, a, fmt, 128)


def test_truncation_and_too_long_prompt(llama_tok):
    q, a = QA[0]
    n_prompt = len(encode_prompt(llama_tok, q, "llama2"))
    enc = encode_qa(llama_tok, q, a, "llama2", n_prompt + 3)
    assert enc["attention_mask"].sum() == n_prompt + 3
    assert (enc["labels"] != IGNORE_INDEX).sum() == 3
    with pytest.raises(ValueError, match=r"prompt for question .* is \d+ tokens.*raise max_length"):
        encode_qa(llama_tok, q, a, "llama2", n_prompt)
    with pytest.raises(ValueError, match="unknown prompt format"):
        encode_qa(llama_tok, q, a, "nope", 64)
    with pytest.raises(ValueError, match="needs a chat template"):
        encode_qa(llama_tok, q, a, "chat", 64)


def test_batch_and_left_pad(llama_tok):
    qs, as_ = zip(*QA[:3])
    b = encode_qa_batch(llama_tok, qs, as_, "llama2", 96)
    assert b["input_ids"].shape == (3, 96)
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[5]], pad_id=2, length=3)
    assert ids.tolist() == [[2, 2, 5]] and mask.dtype == np.int32
    assert set(FORMATS) >= {"llama2", "llama3", "zephyr", "chatml", "plain", "chat"}


def test_builtin_templates_render(chatml_tok):
    tok = _no_template(chatml_tok)
    q = QA[0][0]
    l3, special = prompt_text(tok, q, "llama3")
    assert not special and l3.startswith(tok.bos_token) and l3.count(tok.bos_token) == 1
    assert l3.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and q in l3
    z, _ = prompt_text(tok, q, "zephyr")
    assert z == f"<|user|>\n{q}{tok.eos_token}\n<|assistant|>\n"
    # a chat-template prompt is tokenised without a second BOS
    ids = encode_prompt(tok, q, "chatml")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 2
