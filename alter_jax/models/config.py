"""Model configuration: one frozen dataclass, built from a Hugging Face ``config.json``.

The dataclass is hashable so that it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# hidden_act values of transformers' ACT2FN that Llama / Mistral configs use; the MLP applies the same
# function (alter_jax.models.llama.ACTIVATIONS): silu, exact (erf) gelu, tanh-approximated gelu, relu
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


class ConfigError(ValueError):
    """A model configuration that alter-jax cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama / Mistral decoder.

    ``rope_scaling`` is stored as a sorted tuple of (key, value) pairs so the config is
    hashable; use :meth:`rope_scaling_dict` to read it.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False  # q/k/v/o projections carry biases (HF Llama's attention_bias)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # the MLP's gate activation (SUPPORTED_ACTIVATIONS)
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # Numerics: parameters are stored in ``param_dtype``; matmuls run in ``dtype``;
    # softmax, norms and the final log-softmax always run in float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    # Run the decoder layers (no KV cache) as one jax.lax.scan over their parameters stacked at trace
    # time: one layer body is compiled instead of num_layers copies (compile time no longer grows with
    # depth), at the cost of one copy of the layer weights per call (see models/llama.py).
    scan_layers: bool = False
    # jax.nn.dot_product_attention implementation: "xla" (any backend, any mask) or "cudnn"
    # (NVIDIA fused attention; bfloat16/float16 on GPU). None lets JAX choose.
    attention_impl: str | None = "xla"

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        """Backbone parameter count (embedding, layers, head)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = d * self.num_heads * self.head_dim
        kv = 2 * d * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * d
        layer = q + kv + o + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * layer + d + head

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json``.

        Raises :class:`ConfigError` naming ``source`` and the field for anything we do
        not support (model type, rope type, missing fields).
        """
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; alter-jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, MistralForCausalLM)."
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)} needed to build a {model_type} model.")
        num_heads = int(cfg["num_attention_heads"])
        num_kv = int(cfg.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv:
            raise ConfigError(f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv}.")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads

        rope_scaling = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 name
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_params, Mapping):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"{source}: rope_scaling type {rope_type!r} is not supported; choose one of "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}."
                )
            keep = {k: v for k, v in rope_scaling.items() if k not in ("type", "rope_theta") and v is not None}
            keep["rope_type"] = rope_type
            rope_scaling = None if rope_type == "default" else tuple(sorted(keep.items()))

        act = cfg.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported; alter-jax implements "
                              f"{', '.join(SUPPORTED_ACTIVATIONS)} (transformers' names).")
        prf = cfg.get("partial_rotary_factor", 1.0)
        if prf is not None and float(prf) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor {prf!r} (rotary embeddings on part of each head) is "
                              "not supported; alter-jax rotates the whole head (partial_rotary_factor 1.0).")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        sliding = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "mistral" and cfg.get("use_sliding_window") is False:
            sliding = None
        kw = dict(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=None if sliding is None else int(sliding),
            # transformers' Mistral has no biases whatever its config says
            attention_bias=model_type == "llama" and bool(cfg.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
            hidden_act=act,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found; a Hugging Face model folder needs one.") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); the file is corrupt, re-download or re-export it.") from None
        return cls.from_hf_dict(cfg, source=str(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict that ``transformers`` loads back into an equal model."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            out.update(sliding_window=self.sliding_window)
        return out
