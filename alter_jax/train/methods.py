"""Unlearning methods as data: which parameter groups train and which losses combine.

Every method runs in the same trainer (``alter_jax.train.step`` / ``loop``), so
comparisons are like for like. Groups: ``backbone`` (full-parameter methods),
``shared_a``, ``retain_expert``, ``forget_experts``, ``router``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    adapter: bool  # LoRA-style adapters on a frozen backbone (else full-parameter)
    asymmetric: bool = False  # ALTER/AsymLoRA: per-sub-domain forget experts + retain expert
    entropy: bool = False  # token entropy partitions answer tokens (ALTER)
    router: bool = False
    forget_loss: str = "ga"  # ga | npo | simnpo | ihl
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
    ]
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
