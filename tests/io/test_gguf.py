"""GGUF -> HF folder conversion (alter_jax.io.gguf) on a tiny random Llama written here.

The tiny GGUF is written the way llama.cpp writes one: q/k rows permuted, matrices quantized
with `gguf.quants.quantize` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16) or stored as random
K-quant blocks (Q4_K, Q5_K, Q6_K; the gguf package cannot quantize those), plus a tiny
byte-level BPE vocabulary. `tiny_gguf()` is also used by tests/crosscheck/test_gguf_transformers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from alter_jax.io.gguf import (  # noqa: E402
    GGUFConversionError,
    convert_gguf_to_hf,
    permute_qk,
    read_gguf_config,
    unpermute_qk,
    write_llama_gguf,
)

Q = gguf.GGMLQuantizationType

# ----------------------------------------------------------------------------- tiny model

CONFIG = {
    "vocab_size": None,  # filled from the vocabulary
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "a t", "Ġ c", "Ġc at", "i n", "Ġ s", "Ġs at", "o n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Types per HF tensor (layer index filled in); "raw:" means random pre-encoded K-quant blocks.
LAYER_TYPES = [
    {"q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q8_0", "o_proj": "Q5_0",
     "gate_proj": "Q5_1", "up_proj": "F16", "down_proj": "raw:Q6_K"},
    {"q_proj": "F32", "k_proj": "Q8_0", "v_proj": "BF16", "o_proj": "raw:Q5_K",
     "gate_proj": "raw:Q4_K", "up_proj": "Q4_1", "down_proj": "Q8_0"},
]

# Byte offsets of the float16 scale fields inside one block, per K-quant (ggml block layouts).
_KQUANT_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def tiny_vocab() -> dict:
    tokens = SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return {
        "tokens": tokens, "token_types": types, "merges": MERGES, "pre": "smollm",
        "bos_id": 1, "eos_id": 2, "unk_id": 0, "pad_id": 2, "add_bos": False, "chat_template": CHAT_TEMPLATE,
    }


def random_kquant_blocks(qname: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, cols/256*block_bytes] of random blocks with small finite float16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[Q[qname]]
    n_blocks = rows * cols // block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in _KQUANT_F16_FIELDS[qname]:
        scales = rng.uniform(1e-3, 2e-3, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, cols // block_elems * block_bytes)


def tiny_weights(seed: int = 0, tied: bool = True, layer_types=LAYER_TYPES):
    """(HF tensors for write_llama_gguf, tensor types, expected HF float32 weights, config)."""
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    cfg = dict(CONFIG, vocab_size=len(vocab["tokens"]))
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"q_proj": (nh * hd, h), "k_proj": (nkv * hd, h), "v_proj": (nkv * hd, h), "o_proj": (h, nh * hd),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    prefix = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    tensors, types, expected = {}, {}, {}

    def add(name, w, qname):
        if qname.startswith("raw:"):
            blocks = random_kquant_blocks(qname[4:], *w.shape, rng)
            tensors[name] = (blocks, qname[4:])
            # Rows are not permuted for raw blocks, so q/k must not be raw (they are not here).
            expected[name] = dequantize(blocks, Q[qname[4:]]).astype(np.float32)
            return
        tensors[name] = w
        types[name] = qname
        if qname == "F32":
            expected[name] = w
        elif qname == "F16":
            expected[name] = w.astype(np.float16).astype(np.float32)
        else:
            # Quantization blocks run along a row, so permuting rows commutes with it:
            # the un-permuted result is exactly dequantize(quantize(w)).
            expected[name] = dequantize(quantize(w, Q[qname]), Q[qname]).astype(np.float32)

    add("model.embed_tokens.weight", rng.standard_normal((cfg["vocab_size"], h)).astype(np.float32), "Q8_0")
    for i, lt in enumerate(layer_types):
        add(f"model.layers.{i}.input_layernorm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")
        add(f"model.layers.{i}.post_attention_layernorm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")
        for key, shape in shapes.items():
            w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            add(f"model.layers.{i}.{prefix[key]}.{key}.weight", w, lt[key])
    add("model.norm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")
    if not tied:
        add("lm_head.weight", (0.05 * rng.standard_normal((cfg["vocab_size"], h))).astype(np.float32), "Q8_0")
    return tensors, types, expected, cfg


def tiny_gguf(path: Path, seed: int = 0, tied: bool = True, layer_types=LAYER_TYPES):
    """Write the tiny GGUF; returns (path, expected HF float32 weights, config)."""
    tensors, types, expected, cfg = tiny_weights(seed, tied, layer_types)
    write_llama_gguf(path, tensors, cfg, tiny_vocab(), types)
    return path, expected, cfg


# ----------------------------------------------------------------------------- dequantizers

# Worst-case |x - dequantize(quantize(x))| per 32-element block, as a multiple of the block's
# step: symmetric formats (d = amax / 2^(b-1), codes -2^(b-1)..2^(b-1)-1) may clip one end by
# a full step; min/max formats (d = (max - min) / (2^b - 1)) round to half a step.
_BLOCK_BOUNDS = {
    "Q8_0": lambda b: np.abs(b).max(-1) / 127 * 0.5,
    "Q4_0": lambda b: np.abs(b).max(-1) / 8 * 1.0,
    "Q5_0": lambda b: np.abs(b).max(-1) / 16 * 1.0,
    "Q4_1": lambda b: (b.max(-1) - b.min(-1)) / 15 * 0.5,
    "Q5_1": lambda b: (b.max(-1) - b.min(-1)) / 31 * 0.5,
}


@pytest.mark.parametrize("qname", sorted(_BLOCK_BOUNDS))
def test_block_dequantizer_within_format_error_bound(qname):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 3, size=(16, 1))).astype(np.float32)
    y = dequantize(quantize(x, Q[qname]), Q[qname])
    assert y.shape == x.shape and y.dtype == np.float32
    blocks_x, blocks_err = x.reshape(-1, 32), np.abs(y - x).reshape(-1, 32)
    # Scales are stored as float16 (relative error 2^-11, times codes up to 2^b): small slack.
    bound = _BLOCK_BOUNDS[qname](blocks_x) * 1.01 + np.abs(blocks_x).max(-1) * 4e-3
    assert (blocks_err.max(-1) <= bound).all()
    assert blocks_err.mean() > 0  # really quantized


def test_float_dequantizers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(x, Q.F32), x)
    np.testing.assert_array_equal(dequantize(x.astype(np.float16), Q.F16), x.astype(np.float16).astype(np.float32))
    bf = dequantize(quantize(x, Q.BF16), Q.BF16)
    # bfloat16 keeps 8 significant bits: relative error <= 2^-8 after round-to-nearest.
    assert np.all(np.abs(bf - x) <= np.abs(x) * 2.0**-8)
    bits = bf.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)  # exactly representable in bfloat16


def _f16(b: np.ndarray, off: int) -> float:
    return float(b[off : off + 2].view(np.float16)[0])


def _k_scale_min(j: int, s: np.ndarray) -> tuple[int, int]:
    """6-bit sub-block scale and min j (0..7) of the 12 packed bytes of Q4_K / Q5_K."""
    if j < 4:
        return int(s[j] & 63), int(s[j + 4] & 63)
    return int((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)), int((s[j + 4] >> 4) | ((s[j] >> 6) << 4))


def ref_q4_k(b: np.ndarray) -> np.ndarray:
    """Loop reference of one Q4_K block (144 bytes: d, dmin, scales[12], qs[128])."""
    d, dmin, sc, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:144]
    y = []
    for j in range(4):  # 4 chunks of 64 values = two 32-value sub-blocks (low, high nibbles)
        s1, m1 = _k_scale_min(2 * j, sc)
        s2, m2 = _k_scale_min(2 * j + 1, sc)
        q = qs[32 * j : 32 * j + 32]
        y += [d * s1 * int(v & 0xF) - dmin * m1 for v in q]
        y += [d * s2 * int(v >> 4) - dmin * m2 for v in q]
    return np.array(y)


def ref_q5_k(b: np.ndarray) -> np.ndarray:
    """Loop reference of one Q5_K block (176 bytes: d, dmin, scales[12], qh[32], qs[128])."""
    d, dmin, sc, qh, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:48], b[48:176]
    y = []
    for j in range(4):
        s1, m1 = _k_scale_min(2 * j, sc)
        s2, m2 = _k_scale_min(2 * j + 1, sc)
        q = qs[32 * j : 32 * j + 32]
        y += [d * s1 * (int(v & 0xF) + 16 * ((int(h) >> (2 * j)) & 1)) - dmin * m1 for v, h in zip(q, qh)]
        y += [d * s2 * (int(v >> 4) + 16 * ((int(h) >> (2 * j + 1)) & 1)) - dmin * m2 for v, h in zip(q, qh)]
    return np.array(y)


def ref_q6_k(b: np.ndarray) -> np.ndarray:
    """Loop reference of one Q6_K block (210 bytes: ql[128], qh[64], int8 scales[16], d)."""
    ql, qh, sc, d = b[0:128], b[128:192], b[192:208].view(np.int8), _f16(b, 208)
    y = np.zeros(256)
    for n in range(2):  # two halves of 128 values
        L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
        for i in range(32):
            q1 = (int(L[i]) & 0xF) | (((int(H[i]) >> 0) & 3) << 4)
            q2 = (int(L[i + 32]) & 0xF) | (((int(H[i]) >> 2) & 3) << 4)
            q3 = (int(L[i]) >> 4) | (((int(H[i]) >> 4) & 3) << 4)
            q4 = (int(L[i + 32]) >> 4) | (((int(H[i]) >> 6) & 3) << 4)
            is_ = i // 16
            base = 128 * n
            y[base + i] = d * S[is_] * (q1 - 32)
            y[base + i + 32] = d * S[is_ + 2] * (q2 - 32)
            y[base + i + 64] = d * S[is_ + 4] * (q3 - 32)
            y[base + i + 96] = d * S[is_ + 6] * (q4 - 32)
    return y


@pytest.mark.parametrize("qname,ref", [("Q4_K", ref_q4_k), ("Q5_K", ref_q5_k), ("Q6_K", ref_q6_k)])
def test_kquant_dequantizer_matches_loop_reference(qname, ref):
    rng = np.random.default_rng(3)
    blocks = random_kquant_blocks(qname, 3, 512, rng)  # 3 rows x 2 blocks
    got = dequantize(blocks, Q[qname])
    assert got.shape == (3, 512)
    bb = gguf.GGML_QUANT_SIZES[Q[qname]][1]
    want = np.stack([ref(blk) for blk in blocks.reshape(-1, bb)]).reshape(3, 512)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.abs(want).max() > 0


# ----------------------------------------------------------------------------- permutation


def test_permute_qk_is_llama_cpp_layout_and_inverse():
    n_head, half, d_in = 3, 4, 5
    w = np.arange(n_head * 2 * half * d_in, dtype=np.float32).reshape(n_head * 2 * half, d_in)
    p = permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(half):
            for j in range(2):  # GGUF row 2i+j of a head holds HF row j*half+i (pairs interleaved)
                np.testing.assert_array_equal(p[h * 2 * half + 2 * i + j], w[h * 2 * half + j * half + i])
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    b = np.arange(n_head * 2 * half, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, n_head), n_head), b)


# ----------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path, expected, cfg = tiny_gguf(root / "tiny.gguf")
    out = convert_gguf_to_hf(path, root / "hf")
    return path, out, expected, cfg


def test_weights_equal_dequantized_originals(converted):
    from safetensors.numpy import load_file

    _, out, expected, _ = converted
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(expected)
    assert "lm_head.weight" not in got  # tied: no `output` tensor in the file
    for name, want in expected.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # An F32 q_proj comes back bit-exact, i.e. the row permutation was undone exactly.
    assert "model.layers.1.self_attn.q_proj.weight" in expected


def test_config_fields(converted):
    path, out, _, cfg = converted
    written = json.loads((out / "config.json").read_text())
    assert written == read_gguf_config(path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        assert written[key] == cfg[key], key
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    assert written["tie_word_embeddings"] is True
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 2, 2)
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    marker = json.loads((out / "alter_jax_gguf.json").read_text())
    assert marker["tensor_types"]["Q6_K"] == 1 and marker["tensor_types"]["Q8_0"] == 4


def test_tokenizer_round_trips(converted):
    from transformers import AutoTokenizer

    _, out, _, _ = converted
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert len(tok) == len(tiny_vocab()["tokens"])
    ids = tok("the cat sat on 2024 mats", add_special_tokens=True)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # Merges apply ("Ġcat", "Ġsat"), digits stay single (llama.cpp's "smollm" pre-tokenizer), no BOS added.
    assert pieces[:4] == ["t", "he", "Ġcat", "Ġsat"] and pieces[4:11] == ["Ġ", "on", "Ġ", "2", "0", "2", "4"]
    for text in ["the cat sat on the mat.", "  Ünïcödé 日本語 🤖\n\ttabs 12345", ""]:
        assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1  # special tokens stay whole


def test_untied_output_and_float16(tmp_path):
    from safetensors.numpy import load_file

    path, expected, _ = tiny_gguf(tmp_path / "untied.gguf", seed=5, tied=False)
    out = convert_gguf_to_hf(path, tmp_path / "hf16", dtype="float16")
    got = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert got["lm_head.weight"].dtype == np.float16
    np.testing.assert_array_equal(got["lm_head.weight"], expected["lm_head.weight"].astype(np.float16))
    # Converting again into the same (converter-written) folder replaces it atomically.
    convert_gguf_to_hf(path, out)
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf16", "untied.gguf"]  # no temp leftovers


# ----------------------------------------------------------------------------- errors


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
    tensors, types, _, cfg = tiny_weights()
    rows, cols = tensors["model.layers.0.mlp.up_proj.weight"].shape
    bb = gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]
    tensors["model.layers.0.mlp.up_proj.weight"] = (np.zeros((rows, cols // 32 * bb), np.uint8), "IQ4_NL")
    path = write_llama_gguf(tmp_path / "iq.gguf", tensors, cfg, tiny_vocab(), types)
    with pytest.raises(GGUFConversionError) as err:
        convert_gguf_to_hf(path, tmp_path / "out")
    msg = str(err.value)
    assert "iq.gguf" in msg and "blk.0.ffn_up.weight" in msg and "IQ4_NL" in msg and "Q4_K" in msg
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iq.gguf"]


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFConversionError, match=r"gpt2\.gguf.*general\.architecture is 'gpt2'"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_missing_file_and_foreign_output_folder(tmp_path, converted):
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        convert_gguf_to_hf(tmp_path / "nothere.gguf", tmp_path / "out")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GGUFConversionError, match="not empty"):
        convert_gguf_to_hf(converted[0], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(GGUFConversionError, match="dtype"):
        convert_gguf_to_hf(converted[0], tmp_path / "x", dtype="int8")


# ----------------------------------------------------------------------------- bin/convert


def test_bin_convert_cli(tmp_path, converted):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    exe = [sys.executable, str(repo / "bin" / "convert")]
    help_ = subprocess.run(exe + ["--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_.returncode == 0 and "smollm2-135m-instruct" in help_.stdout and "--dtype" in help_.stdout
    done = subprocess.run(exe + [str(converted[0]), str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dequantized" in done.stderr and "wrote" in done.stderr  # progress output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (converted[1] / "model.safetensors").read_bytes()
    bad = subprocess.run(exe + [str(tmp_path / "missing.gguf"), str(tmp_path / "o2")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "convert: error: GGUF file not found" in bad.stderr and "Traceback" not in bad.stderr
