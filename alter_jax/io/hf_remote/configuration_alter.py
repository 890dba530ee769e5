"""Configuration of an ALTER-unlearned model for transformers (``trust_remote_code=True``).

Written by alter-jax's ``bin/export --format transformers``; needs only ``transformers``.
The backbone fields are the usual Llama / Mistral ones; ``alter`` (a dict) holds the
entropy-gated adapter's settings (see ``modeling_alter.py``):

* ``layers``: the adapted linear layers by module name (``model.layers.0.self_attn.q_proj``);
* ``rank``, ``scale`` (``alpha / rank``), ``num_forget_experts`` (N; E = N + 1 experts, 0 = retain),
  ``use_router``, ``top_k``, ``tau_high``, ``tau_low``, ``retain_bias``;
* ``q`` (Tsallis order, 1 = Shannon) and ``threshold`` (θ: a token is high-entropy when ``S_q > θ``);
* ``entropy_source``: ``"base"`` (every scored token's entropy from the frozen backbone) or
  ``"self"`` (``self_iters`` fixed-point passes on the gated model's own distribution);
  generated tokens always take the entropy of the distribution they were drawn from.
"""

from transformers import LlamaConfig, MistralConfig


class AlterLlamaConfig(LlamaConfig):
    """A Llama backbone with an ALTER adapter (settings in ``self.alter``)."""

    model_type = "alter_llama"


class AlterMistralConfig(MistralConfig):
    """A Mistral backbone with an ALTER adapter (settings in ``self.alter``)."""

    model_type = "alter_mistral"
