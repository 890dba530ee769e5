"""Install adapters into a backbone, split the model into parameter groups, merge experts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alter_jax.adapters.lora import GROUPS, AdapterConfig, AdapterParam, AsymLoRA
from alter_jax.models.llama import TARGET_MODULES, AdaptableLinear, Transformer, linear_layers


class AdapterTargetError(ValueError):
    """A target module name that matches no layer of the model."""


def adapted_layers(model: Transformer) -> dict[str, AdaptableLinear]:
    """Layers that carry an adapter, by dotted path."""
    return {k: v for k, v in linear_layers(model).items() if v.adapter is not None}


def add_adapters(model: Transformer, cfg: AdapterConfig, *, seed: int = 0, abstract: bool = False) -> Transformer:
    """Install an :class:`AsymLoRA` in every linear layer named in ``cfg.target_modules``.

    Targets are module names (``q_proj``) or dotted suffixes (``layers.0.self_attn.q_proj``).
    Raises :class:`AdapterTargetError` when a target matches nothing (a typo would
    otherwise silently train nothing). Mutates and returns ``model``. ``abstract=True``
    installs shape-only adapters (``nnx.eval_shape``, no initialisation runs) whose
    variables the caller must fill with ``set_value`` (a loader does).
    """
    layers = linear_layers(model)
    rngs = nnx.Rngs(seed)
    matched = {t: 0 for t in cfg.target_modules}
    for path, lin in sorted(layers.items(), key=lambda kv: _natural(kv[0])):
        for t in cfg.target_modules:
            if path == t or path.endswith("." + t):
                if abstract:
                    lin.adapter = nnx.eval_shape(
                        lambda lin=lin: AsymLoRA(lin.d_in, lin.d_out, cfg, rngs=nnx.Rngs(0), dtype=str(lin.dtype))
                    )
                else:
                    lin.adapter = AsymLoRA(lin.d_in, lin.d_out, cfg, rngs=rngs, dtype=str(lin.dtype))
                matched[t] += 1
                break
    unmatched = [t for t, n in matched.items() if n == 0]
    if unmatched:
        raise AdapterTargetError(
            f"adapter.target_modules {unmatched} match no layer of this model; valid module names are "
            f"{', '.join(TARGET_MODULES)} (or a dotted path such as layers.0.self_attn.q_proj)."
        )
    return model


def _natural(path: str):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def split_groups(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, dict[str, nnx.State], nnx.State]:
    """``(graphdef, backbone, {group: state}, rest)``: one pytree per adapter group.

    ``backbone`` holds the frozen ``nnx.Param`` weights; groups are keyed as in
    :data:`alter_jax.adapters.lora.GROUPS` (empty groups are empty States).
    """
    graphdef, backbone, *groups, rest = nnx.split(model, nnx.Param, *GROUPS.values(), ...)
    return graphdef, backbone, dict(zip(GROUPS, groups)), rest


def merge_groups(graphdef, backbone, groups: dict[str, nnx.State], rest) -> Transformer:
    return nnx.merge(graphdef, backbone, *[groups[k] for k in GROUPS], rest)


def count_params(state: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(state)))


def merged_backbone(model: Transformer, expert: int = 0) -> Transformer:
    """A plain backbone (no adapters) with ``W0 + s · B_expert A`` folded into each kernel."""
    clone = nnx.clone(model)  # the input model is untouched
    for lin in linear_layers(clone).values():
        ad = lin.adapter
        if ad is None:
            continue
        delta = ad.cfg.scale * (ad.experts()[expert] @ ad.shared_a[...]).T  # [d_in, d_out]
        lin.kernel[...] = (lin.kernel[...].astype(jnp.float32) + delta).astype(lin.kernel[...].dtype)
        lin.adapter = None
    return clone


def adapter_state(model: Transformer) -> nnx.State:
    """All adapter parameters (every group) as one State."""
    return nnx.state(model, AdapterParam)
