"""Issue 6 (d): tokens/s and model FLOP utilisation of the train step on Llama-shaped models.

``bin/bench --what mfu --model llama2-7b`` builds a random-weight model of the named shape
directly on the accelerator (no checkpoint: a 7B checkpoint would be 13 GB to write), in
``--dtype`` (bfloat16 by default), and times, interleaved in one process:

* the JAX ALTER step (``drift`` struct penalty) and the JAX plain-LoRA step
  (:func:`alter_jax.bench.suites.jax_step_fn`, the trainer's own jitted step);
* the PyTorch route on the same device: ``transformers`` ``LlamaForCausalLM`` of the same
  shape (its own random weights; speed does not depend on their values) with PEFT LoRA
  (r=8, the 7 projections), AdamW, ``attn_implementation="sdpa"``.

Model FLOPs (:func:`step_flops`) follow the PaLM appendix-B convention, adapted to a
frozen backbone: a linear layer costs ``2·P`` per token forward and ``2·P`` backward (input
gradients only: the frozen weights need no weight gradient), attention ``4·L·T·H·d`` per
token forward (QKᵀ and AV, causal mask not discounted) and twice that backward. LoRA and
router FLOPs are < 1 % at r=8 and are not counted. Every variant is charged the same model
FLOPs, so an extra pullback (ALTER's exact A/B isolation) shows as lower MFU, as it should.
MFU = model FLOPs / (step time × peak dense bf16 FLOP/s of the device); the peak comes from
:data:`PEAK_FLOPS` by device kind or ``--peak-tflops``. XLA's own count of the compiled
JAX forward (``cost_analysis``) is reported beside the analytic forward count as a cross-check.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from alter_jax.bench.timing import interleaved
from alter_jax.models.config import ModelConfig

# Llama-shaped models for (d). ``llama-1b`` is Llama-3.2-1B's shape, ``llama2-7b`` Llama-2-7B's;
# ``mfu-tiny`` is for tests on CPU.
SHAPES: dict[str, dict] = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=8192),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, tie_word_embeddings=False, max_position_embeddings=4096),
    "mfu-tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=1024),
}

# Peak dense bfloat16 FLOP/s (vendor data sheets, no sparsity), matched as a substring of
# ``jax.devices()[0].device_kind``; the first match wins, so longer names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)


def shape_config(name: str, dtype: str = "bfloat16", remat: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` of a named shape (``ValueError`` naming the choices)."""
    if name not in SHAPES:
        raise ValueError(f"unknown MFU shape {name!r}; choose from {', '.join(SHAPES)}")
    attn = "cudnn" if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16") else "xla"
    return ModelConfig(**SHAPES[name], dtype=dtype, param_dtype=dtype, remat=remat, attention_impl=attn,
                       bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind, or ``None`` when unknown (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    return next((p for key, p in PEAK_FLOPS if key.lower() in device_kind.lower()), None)


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of ``[batch, seq]`` tokens.

    linear = 2 · (matmul parameters: the 7 projections of every layer and the LM head) per
    token; attention = 4 · L · T · H · d per token (scores and weighted values)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = d * cfg.num_heads * hd + 2 * d * cfg.num_kv_heads * hd + cfg.num_heads * hd * d + 3 * d * f
    matmul_params = cfg.num_layers * per_layer + d * cfg.vocab_size
    tokens = batch * seq
    linear = 2.0 * matmul_params * tokens
    attention = 4.0 * cfg.num_layers * seq * cfg.num_heads * hd * tokens
    return linear, attention


def step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one train step with a frozen backbone (forward + input-gradient backward)."""
    linear, attention = forward_flops(cfg, batch, seq)
    return 2.0 * linear + 3.0 * attention


def random_backbone(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """A random-weight :class:`Transformer`, initialised under ``jit`` so the weights are
    created on the default device in ``cfg.param_dtype`` without a host copy."""
    from alter_jax.models.llama import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, _ = nnx.split(abstract)

    @jax.jit
    def init():
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, init())


def torch_route_step_fn(cfg: ModelConfig, spec, batch: dict) -> Callable[[], object]:
    """transformers + PEFT LoRA step on the accelerator (CUDA when there, else CPU), ``cfg``'s shape and dtype."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alter_jax.bench.suites import peft_lora_step_fn

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                     tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
                     attn_implementation="sdpa", dtype=dtype)
    with torch.device(dev):
        base = LlamaForCausalLM._from_config(hf, dtype=dtype)
    if cfg.remat:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    return peft_lora_step_fn(base, spec, batch)


@dataclasses.dataclass(frozen=True)
class MfuSpec:
    shape: str = "llama-1b"
    dtype: str = "bfloat16"
    remat: bool = False
    peak_tflops: float | None = None


def bench_mfu(spec, mfu: MfuSpec, *, with_torch: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Rows (tokens/s, MFU) of the JAX ALTER step, the JAX LoRA step and the PyTorch LoRA step."""
    from alter_jax.bench.suites import _ratio, _row, jax_step_fn, step_batch

    cfg = shape_config(mfu.shape, mfu.dtype, mfu.remat)
    backbone = random_backbone(cfg, spec.seed)
    batch = step_batch(spec, cfg.vocab_size)
    fns = {"JAX ALTER step (drift)": jax_step_fn(backbone, spec, "alter", "drift", batch),
           "JAX LoRA step": jax_step_fn(backbone, spec, "lora_gd", "drift", batch)}
    if with_torch:
        fns["PyTorch+PEFT LoRA step"] = torch_route_step_fn(cfg, spec, batch)
    times = interleaved(fns, spec.steps, spec.warmup)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, mfu.peak_tflops)
    flops = step_flops(cfg, spec.batch, spec.seq)
    rows = []
    for t in times.values():
        row = _row("mfu", t, spec.batch * spec.seq)
        row["tflops_per_s"] = flops / t.median_s / 1e12
        row["mfu"] = None if peak is None else flops / t.median_s / peak
        rows.append(row)
    med = {k: t.median_s for k, t in times.items()}
    ratios = [_ratio("mfu", "(d) JAX ALTER / JAX LoRA time", med["JAX ALTER step (drift)"] / med["JAX LoRA step"])]
    if with_torch:
        ratios.append(_ratio("mfu", "(d) JAX ALTER / PyTorch LoRA time",
                             med["JAX ALTER step (drift)"] / med["PyTorch+PEFT LoRA step"]))
    if peak is not None:
        ratios.append(_ratio("mfu", f"(d) JAX ALTER step MFU ({mfu.shape})",
                             flops / med["JAX ALTER step (drift)"] / peak, ">= 0.4"))
    extra = {"mfu_shape": mfu.shape, "mfu_params_b": cfg.num_params() / 1e9, "mfu_dtype": mfu.dtype,
             "mfu_remat": mfu.remat, "device_kind": device.device_kind, "peak_tflops": None if peak is None else peak / 1e12,
             "model_tflops_per_step": flops / 1e12,
             "forward_tflops_analytic": sum(forward_flops(cfg, spec.batch, spec.seq)) / 1e12}
    xla = xla_forward_flops(backbone, spec.batch, spec.seq)
    if xla is not None:
        extra["forward_tflops_xla"] = xla / 1e12
    return rows, ratios, extra


def compiled_flops(step, *args) -> float | None:
    """XLA's FLOP count of a jitted function on these arguments (``None`` where unsupported)."""
    try:
        cost = step.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def xla_forward_flops(model: nnx.Module, batch: int, seq: int) -> float | None:
    """XLA's FLOP count of the jitted forward of ``model`` on ``[batch, seq]`` (cross-check of :func:`forward_flops`)."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
    ids = jnp.zeros((batch, seq), jnp.int32)
    return compiled_flops(fwd, state, ids, jnp.ones_like(ids))
