"""Unlearning methods as data: which parameter groups train and which losses combine.

Every method runs in the same trainer (``alter_jax.train.step`` / ``loop``), so
comparisons are like for like. Groups: ``backbone`` (full-parameter methods),
``shared_a``, ``retain_expert``, ``forget_experts``, ``router``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    adapter: bool  # LoRA-style adapters on a frozen backbone (else full-parameter)
    asymmetric: bool = False  # ALTER/AsymLoRA: per-sub-domain forget experts + retain expert
    entropy: bool = False  # token entropy partitions answer tokens (ALTER)
    router: bool = False
    forget_loss: str = "ga"  # ga | npo | simnpo | ihl | rmu | idk_nll | idk_dpo
    retain_loss: str | None = None  # nll | kl | None
    trainable: tuple[str, ...] = ()
    phase1: bool = False


_LORA = ("shared_a", "retain_expert")
METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec(
            "alter", "ALTER: asymmetric LoRA, entropy-guided IHL forgetting, strict isolation", adapter=True,
            asymmetric=True, entropy=True, router=True, forget_loss="ihl", retain_loss="nll",
            trainable=("shared_a", "retain_expert", "forget_experts", "router"), phase1=True,
        ),
        MethodSpec(
            "asymlora", "AsymLoRA: ALTER without entropy (every token low-entropy, A frozen, no phase I)",
            adapter=True, asymmetric=True, entropy=False, router=True, forget_loss="ihl", retain_loss="nll",
            trainable=("retain_expert", "forget_experts", "router"),
        ),
        MethodSpec("lora_ga", "LoRA + gradient ascent on forget", adapter=True, forget_loss="ga", trainable=_LORA),
        MethodSpec("lora_gd", "LoRA + GradDiff (GA on forget, NLL on retain)", adapter=True, forget_loss="ga",
                   retain_loss="nll", trainable=_LORA),
        MethodSpec("lora_npo", "LoRA + NPO", adapter=True, forget_loss="npo", trainable=_LORA),
        MethodSpec("ga", "full-parameter gradient ascent", adapter=False, forget_loss="ga", trainable=("backbone",)),
        MethodSpec("graddiff", "full-parameter GradDiff", adapter=False, forget_loss="ga", retain_loss="nll",
                   trainable=("backbone",)),
        MethodSpec("kl", "full-parameter GA + KL to the reference on retain (KL-min)", adapter=False,
                   forget_loss="ga", retain_loss="kl", trainable=("backbone",)),
        MethodSpec("npo", "full-parameter NPO", adapter=False, forget_loss="npo", trainable=("backbone",)),
        MethodSpec("npo_gd", "full-parameter NPO + NLL on retain", adapter=False, forget_loss="npo",
                   retain_loss="nll", trainable=("backbone",)),
        MethodSpec("npo_kl", "full-parameter NPO + KL on retain", adapter=False, forget_loss="npo",
                   retain_loss="kl", trainable=("backbone",)),
        MethodSpec("simnpo", "full-parameter SimNPO + NLL on retain", adapter=False, forget_loss="simnpo",
                   retain_loss="nll", trainable=("backbone",)),
        MethodSpec("idk_nll", "full-parameter IdkNLL: NLL of an 'I don't know' answer on each forget question + NLL "
                   "on retain (TOFU's IDK baseline, open-unlearning's IdkNLL)", adapter=False, forget_loss="idk_nll",
                   retain_loss="nll", trainable=("backbone",)),
        MethodSpec("idk_dpo", "full-parameter IdkDPO: DPO preferring an 'I don't know' answer over the true forget "
                   "answer (reference = the model before unlearning) + NLL on retain (open-unlearning's DPO on "
                   "TOFU_QA_forget_idk)", adapter=False, forget_loss="idk_dpo", retain_loss="nll",
                   trainable=("backbone",)),
        MethodSpec("rmu", "RMU: steer one layer's activations on forget tokens to a random direction, keep them "
                   "on retain tokens; only a few MLP weights train (Li et al. 2024)", adapter=False,
                   forget_loss="rmu", retain_loss="rmu", trainable=("backbone",)),
    ]
}


IDK_LOSSES = ("idk_nll", "idk_dpo")


def uses_idk(method: MethodSpec, loss) -> bool:
    """Whether a run needs "I don't know" answers (``idontknow.jsonl``): IdkNLL / IdkDPO, and ALTER /
    AsymLoRA with ``loss.forget_target = "idk"``."""
    return method.forget_loss in IDK_LOSSES or (method.asymmetric and getattr(loss, "forget_target", "ihl") == "idk")


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def rmu_default_params(layer: int) -> str:
    """The WMDP reference choice: the ``down_proj`` kernels of layers ``layer-2 .. layer``."""
    layers = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
    return rf"^layers\.({layers})\.mlp\.down_proj\.kernel$"


def backbone_filter(method: MethodSpec, loss, num_layers: int) -> Callable | None:
    """The NNX filter of the backbone parameters a method trains (``None`` = all of them).

    Only RMU restricts it; its settings are checked here, against the loaded model, with
    errors that name the config field.
    """
    from alter_jax.config import ConfigValueError

    if method.forget_loss != "rmu":
        return None
    if not 0 <= loss.rmu_layer < num_layers:
        raise ConfigValueError(f"config.loss.rmu_layer = {loss.rmu_layer}: the model has {num_layers} decoder layers; "
                         f"choose 0..{num_layers - 1} (the WMDP reference steers layer 7 of 32)")
    pattern = loss.rmu_params or rmu_default_params(loss.rmu_layer)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigValueError(f"config.loss.rmu_params = {pattern!r} is not a regular expression: {e}") from None
    return lambda path, _: bool(rx.search(".".join(map(str, path))))
