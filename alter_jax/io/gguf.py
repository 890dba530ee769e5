"""GGUF (llama.cpp) file -> Hugging Face Llama folder, with NumPy only (no torch).

A GGUF file holds metadata (key/value pairs under llama.cpp's names) and tensors, each
stored in a GGML type (F32, F16, BF16, or a block quantization such as Q8_0, Q4_1, Q6_K).
`convert_gguf_to_hf` turns one into a folder that `transformers` and `alter_jax.io.hf`
both load:

    model.safetensors        float32 (default) HF-named weights
    config.json              a LlamaConfig built from the `llama.*` metadata
    tokenizer.json, ...      a byte-level BPE fast tokenizer (`save_pretrained`)
    alter_jax_gguf.json      provenance: source file name, size, tensor types

Weights
-------
* Dequantization: `gguf.quants.dequantize` (block formats decode as
  x = d * q (Q8_0, Q4_0, Q5_0), x = d * q + m (Q4_1, Q5_1), and the 256-element K-quants
  with 6/8-bit sub-block scales). Result shape is the GGUF shape reversed: a GGUF tensor of
  shape [ne0, ne1] is the row-major HF matrix [ne1, ne0] = [out_features, in_features].
* q/k un-permutation: llama.cpp's HF->GGUF script reorders the rows of q_proj (n_head
  heads) and k_proj (n_kv_head heads) from HF's "rotate_half" layout (first half / second
  half of each head) to the interleaved pair layout of its rotary kernel. Per head, with
  head_dim = 2 * h, the GGUF row index r' = 2 * i + j holds HF row r = j * h + i
  (i < h, j in {0, 1}), i.e.  W_gguf = W_hf.reshape(H, 2, h, D).swapaxes(1, 2).reshape(H*2h, D).
  `unpermute_qk` applies the inverse (swap the (h, 2) axes back).
* Names: token_embd -> model.embed_tokens, blk.N.attn_q -> model.layers.N.self_attn.q_proj,
  ..., output_norm -> model.norm, output -> lm_head (absent: tied embeddings).

Tokenizer
---------
`tokenizer.ggml.model == "gpt2"` (byte-level BPE): vocabulary `tokenizer.ggml.tokens`
(already spelled in GPT-2's byte alphabet), merges `tokenizer.ggml.merges`, pre-tokenizer
chosen from `tokenizer.ggml.pre` the way llama.cpp does, control tokens (token_type 3)
added as special tokens, user-defined ones (type 4) as plain added tokens, and
bos/eos/unk/pad and `tokenizer.chat_template` copied over.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "GGUFConversionError",
    "SUPPORTED_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "convert_gguf_to_hf",
    "read_gguf_config",
    "read_gguf_metadata",
    "dequantize_tensor",
    "gguf_to_hf_name",
    "permute_qk",
    "unpermute_qk",
    "build_tokenizer",
]

MARKER_FILE = "alter_jax_gguf.json"

SUPPORTED_ARCHITECTURES = ("llama",)

# Type names; resolved to `gguf.GGMLQuantizationType` lazily so importing this module is cheap.
_SUPPORTED_TYPE_NAMES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)


def _supported_types() -> frozenset:
    import gguf

    return frozenset(gguf.GGMLQuantizationType[name] for name in _SUPPORTED_TYPE_NAMES)


SUPPORTED_TYPES = _SUPPORTED_TYPE_NAMES

_DTYPES = ("float32", "float16", "bfloat16")

# Pre-tokenizer split pattern of Llama-3-style vocabularies (llama.cpp "llama-bpe").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values and how llama.cpp splits text before BPE for them.
_PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt2": "gpt2",
    # llama.cpp splits every digit alone first, then applies GPT-2's regex, for these:
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class GGUFConversionError(ValueError):
    """A GGUF file this converter cannot turn into a HF Llama folder (message names file and fix)."""


# --------------------------------------------------------------------------- metadata


def _open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise GGUFConversionError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from err


def _field_value(field) -> Any:
    """Python value of a GGUF metadata field: scalar, str, or list (of str / numbers)."""
    import gguf

    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return value


def read_gguf_metadata(path: str | os.PathLike, reader=None) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as plain Python values."""
    path = Path(path)
    reader = reader if reader is not None else _open_reader(path)
    return {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _f32(value: float) -> float:
    """Shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _require(meta: dict, key: str, path: Path) -> Any:
    if key not in meta:
        raise GGUFConversionError(
            f"{path}: metadata key {key!r} is missing; the file is not a complete llama.cpp Llama GGUF "
            "(re-export it with llama.cpp's convert_hf_to_gguf.py)"
        )
    return meta[key]


def _check_architecture(meta: dict, path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"{path}: general.architecture is {arch!r}; this converter supports {list(SUPPORTED_ARCHITECTURES)} "
            "(Llama-family decoders). Use the model's original Hugging Face weights instead."
        )
    return arch


def _config_from_metadata(meta: dict, path: Path, tensor_names: set[str] | None = None) -> dict[str, Any]:
    """HF LlamaConfig dict from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
    arch = _check_architecture(meta, path)
    p = f"{arch}."
    hidden = int(_require(meta, p + "embedding_length", path))
    n_head = int(_require(meta, p + "attention.head_count", path))
    n_kv = int(meta.get(p + "attention.head_count_kv", n_head))
    head_dim = int(meta.get(p + "attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFConversionError(
            f"{path}: {p}rope.dimension_count={rope_dim} differs from the head size {head_dim} (partial rotary); "
            "Llama applies rotary embeddings to the whole head, so this file is not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(p + "vocab_size", len(tokens) if tokens is not None else 0))
    if vocab <= 0:
        raise GGUFConversionError(f"{path}: neither {p}vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    theta = _f32(meta.get(p + "rope.freq_base", 10000.0))
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = meta.get(p + "rope.scaling.type", "none")
    if scaling == "linear":
        rope_parameters = {"rope_type": "linear", "rope_theta": theta, "factor": _f32(meta[p + "rope.scaling.factor"])}
    elif scaling not in ("none", None):
        raise GGUFConversionError(f"{path}: {p}rope.scaling.type={scaling!r} is not supported (only 'none' and 'linear')")
    if tensor_names is not None and "rope_freqs.weight" in tensor_names:
        raise GGUFConversionError(
            f"{path}: tensor 'rope_freqs.weight' (Llama-3.1 style frequency scaling) is not supported by this "
            "converter; convert from the original Hugging Face folder instead"
        )
    names = tensor_names or set()
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, p + "block_count", path)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rms_norm_eps": _f32(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_parameters": rope_parameters,
        "attention_bias": any(n.endswith("attn_q.bias") for n in names),
        "mlp_bias": False,
        "tie_word_embeddings": tensor_names is not None and "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        cfg["rope_scaling"] = dict(rope_parameters)
    return cfg


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF `config.json` dict (LlamaConfig fields) that `convert_gguf_to_hf` writes for `path`."""
    path = Path(path)
    reader = _open_reader(path)
    meta = read_gguf_metadata(path, reader)
    return _config_from_metadata(meta, path, {t.name for t in reader.tensors})


# --------------------------------------------------------------------------- tensors


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF row order for q/k: [H*2h, ...] -> [H*2h, ...] (pairs interleaved)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: GGUF q/k rows back to HF's rotate_half order. Shape kept."""
    if w.shape[0] % (2 * n_head):
        raise GGUFConversionError(f"q/k projection with {w.shape[0]} rows cannot hold {n_head} heads of even size")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_name(name: str) -> str:
    """GGUF tensor name -> HF Llama parameter name (KeyError-free: raises GGUFConversionError)."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise GGUFConversionError(f"unknown GGUF tensor {name!r}")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{kind}"
    raise GGUFConversionError(f"unknown GGUF tensor {name!r} (not part of a Llama decoder)")


def dequantize_tensor(tensor, path: str | os.PathLike = "<gguf>") -> np.ndarray:
    """float32 array of a `gguf.ReaderTensor`, in HF (row-major) shape = reversed GGUF shape."""
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    if qtype not in _supported_types():
        raise GGUFConversionError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which this converter cannot dequantize "
            f"(supported: {', '.join(_SUPPORTED_TYPE_NAMES)}). Re-quantize the model with llama.cpp to one of "
            "those types, or start from the original Hugging Face weights."
        )
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    data = np.asarray(tensor.data)
    if data.dtype == np.float32:
        out = np.array(data, dtype=np.float32)
    else:
        out = np.asarray(dequantize(data, qtype), dtype=np.float32)
    if out.size != int(np.prod(shape)):
        raise GGUFConversionError(f"{path}: tensor {tensor.name!r} ({qtype.name}) decodes to {out.size} values, expected shape {shape}")
    return out.reshape(shape)


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    kind = _PRE_TOKENIZERS.get(pre or "default")
    if kind is None:
        raise GGUFConversionError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported (known: {sorted(_PRE_TOKENIZERS)}); "
            "the text would be split differently from llama.cpp. Use the model's original tokenizer.json."
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind == "gpt2":
        return byte_level
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def build_tokenizer(meta: dict[str, Any], path: str | os.PathLike = "<gguf>", model_max_length: int | None = None):
    """`transformers.PreTrainedTokenizerFast` (byte-level BPE) from `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(
            f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') vocabularies are supported. "
            "Use the model's original tokenizer files."
        )
    tokens = list(_require(meta, "tokenizer.ggml.tokens", path))
    merges_raw = _require(meta, "tokenizer.ggml.merges", path)
    merges = []
    for m in merges_raw:
        pair = m.split(" ")
        if len(pair) != 2:
            raise GGUFConversionError(f"{path}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3])
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        tok.add_tokens(user)

    def token_of(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token_of("bos_token_id"), token_of("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        specials = [(t, vocab[t]) for t in dict.fromkeys([t for t, on in ((bos, add_bos), (eos, add_eos)) if on])]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs: dict[str, Any] = {
        "tokenizer_object": tok,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_of("unknown_token_id"),
        "pad_token": token_of("padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    template = meta.get("tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})


# --------------------------------------------------------------------------- conversion


def _atomic_out(out_dir: Path) -> Path:
    """Refuse to replace a non-empty folder that is not a previous conversion; return a temp dir beside it."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise GGUFConversionError(f"output {out_dir} exists and is not a folder; choose another output path")
        if any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).is_file():
            raise GGUFConversionError(
                f"output folder {out_dir} is not empty and was not written by this converter; "
                "choose a new or empty output folder"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _portable_tokenizer_config(file: Path) -> None:
    """Name the class `PreTrainedTokenizerFast`, which transformers 4.x and 5.x both resolve."""
    cfg = json.loads(file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the result the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _save_safetensors(tensors: dict[str, np.ndarray], file: Path, dtype: str) -> None:
    if dtype == "bfloat16":
        import ml_dtypes
        from safetensors import serialize_file

        serialize_file(
            {k: {"dtype": "bfloat16", "shape": list(v.shape), "data": v.astype(ml_dtypes.bfloat16).tobytes()} for k, v in tensors.items()},
            str(file),
            metadata={"format": "pt"},
        )
        return
    from safetensors.numpy import save_file

    np_dtype = np.float32 if dtype == "float32" else np.float16
    save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert a llama.cpp Llama GGUF file into a HF folder at `out_dir`; returns `out_dir`.

    Writes `model.safetensors` (weights dequantized to float32, cast to `dtype`), `config.json`,
    the tokenizer files and `alter_jax_gguf.json`, first into a temp folder beside `out_dir`
    that is then renamed (a crash never leaves a half-written `out_dir`). An existing `out_dir`
    is replaced only if empty or written by this function.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if dtype not in _DTYPES:
        raise GGUFConversionError(f"dtype={dtype!r} is not supported; choose one of {list(_DTYPES)}")
    say = progress or (lambda msg: None)
    reader = _open_reader(gguf_path)
    meta = read_gguf_metadata(gguf_path, reader)
    names = {t.name for t in reader.tensors}
    config = _config_from_metadata(meta, gguf_path, names)
    config["torch_dtype"] = dtype
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    # Check every tensor's type and name before the slow part, so errors come at once.
    supported = _supported_types()
    for t in reader.tensors:
        if t.tensor_type not in supported:
            dequantize_tensor(t, gguf_path)  # raises the clear error
        try:
            gguf_to_hf_name(t.name)
        except GGUFConversionError as err:
            raise GGUFConversionError(f"{gguf_path}: {err}") from None
    if "token_embd.weight" not in names:
        raise GGUFConversionError(f"{gguf_path}: tensor 'token_embd.weight' is missing")

    say(f"reading {len(reader.tensors)} tensors from {gguf_path.name}")
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(reader.tensors):
        w = dequantize_tensor(t, gguf_path)
        stem = t.name.rpartition(".")[0]
        if stem.endswith(".attn_q"):
            w = unpermute_qk(w, n_head)
        elif stem.endswith(".attn_k"):
            w = unpermute_qk(w, n_kv)
        tensors[gguf_to_hf_name(t.name)] = w
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            say(f"  dequantized {i + 1}/{len(reader.tensors)} tensors")
    if config["attention_bias"]:  # HF Llama's attention_bias covers q/k/v/o: a file without o biases gets zeros
        for layer in range(config["num_hidden_layers"]):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                name = f"model.layers.{layer}.self_attn.{proj}"
                if f"{name}.bias" not in tensors and f"{name}.weight" in tensors:
                    tensors[f"{name}.bias"] = np.zeros(tensors[f"{name}.weight"].shape[0], np.float32)
    emb = tensors["model.embed_tokens.weight"]
    if emb.shape != (config["vocab_size"], config["hidden_size"]):
        raise GGUFConversionError(
            f"{gguf_path}: token_embd has shape {emb.shape}, metadata says vocab={config['vocab_size']} hidden={config['hidden_size']}"
        )

    say("building tokenizer")
    tokenizer = build_tokenizer(meta, gguf_path, model_max_length=config["max_position_embeddings"])

    tmp = _atomic_out(out_dir)
    try:
        say(f"writing {out_dir}")
        _save_safetensors(tensors, tmp / "model.safetensors", dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        types: dict[str, int] = {}
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        marker = {
            "source": str(gguf_path.resolve()),
            "source_size": gguf_path.stat().st_size,
            "architecture": meta.get("general.architecture"),
            "name": meta.get("general.name"),
            "tensor_types": types,
            "dtype": dtype,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(tmp)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done: {out_dir}")
    return out_dir


def _print_progress(msg: str) -> None:  # pragma: no cover - used by the CLI
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- writing (tests, small exports)


def hf_to_gguf_name(name: str) -> str:
    """HF Llama parameter name -> GGUF tensor name (inverse of `gguf_to_hf_name`)."""
    for gname, hname in _GLOBAL_NAMES.items():
        if name in (f"{hname}.weight", f"{hname}.bias"):
            return f"{gname}.{name.rpartition('.')[2]}"
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner, kind = ".".join(parts[3:-1]), parts[-1]
        for gname, hname in _LAYER_NAMES.items():
            if inner == hname:
                return f"blk.{int(parts[2])}.{gname}.{kind}"
    raise GGUFConversionError(f"HF tensor {name!r} has no GGUF name in a Llama decoder")


def write_llama_gguf(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    tensor_types: dict[str, str] | None = None,
) -> Path:
    """Write HF-named Llama weights as a llama.cpp-style GGUF file (the inverse of this module).

    tensors: HF name -> float32 array [out, in] (or [n]), quantized to `tensor_types[name]`
        (a GGML type name; default F32) with `gguf.quants.quantize`; or HF name ->
        `(uint8 blocks [out, bytes], "Q6_K")` to store already-encoded blocks as they are.
        q_proj / k_proj rows are permuted the way llama.cpp's converter does (`permute_qk`).
    config: HF LlamaConfig dict; tokenizer: {"tokens", "token_types", "merges", "pre",
        "bos_id", "eos_id", "unk_id", "pad_id", "add_bos", "chat_template"} (missing keys skipped).
    """
    import gguf
    from gguf.quants import quantize

    path = Path(path)
    types = tensor_types or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("alter-jax test model")
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_tokenizer_model("gpt2")
    if tokenizer.get("pre"):
        writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(list(tokenizer["tokens"]))
    if tokenizer.get("token_types") is not None:
        writer.add_token_types(list(tokenizer["token_types"]))
    writer.add_token_merges(list(tokenizer["merges"]))
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
        if tokenizer.get(key) is not None:
            add(int(tokenizer[key]))
    writer.add_add_bos_token(bool(tokenizer.get("add_bos", False)))
    if tokenizer.get("chat_template"):
        writer.add_chat_template(tokenizer["chat_template"])

    for name, value in tensors.items():
        gname = hf_to_gguf_name(name)
        if isinstance(value, tuple):
            blocks, qname = value
            writer.add_tensor(gname, np.asarray(blocks, dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType[qname])
            continue
        w = np.asarray(value, dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            w = permute_qk(w, n_head)
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            w = permute_qk(w, n_kv)
        qname = types.get(name, "F32")
        if qname == "F32":
            writer.add_tensor(gname, w)
        elif qname == "F16":
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[qname]
            writer.add_tensor(gname, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
