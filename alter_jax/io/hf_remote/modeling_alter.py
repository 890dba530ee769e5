"""ALTER's entropy-gated model in PyTorch / transformers (``trust_remote_code=True``).

Written into a model folder by alter-jax's ``bin/export --format transformers``; needs only
``torch`` and ``transformers`` (alter-jax is not imported). Load it with::

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The model is transformers' own ``LlamaForCausalLM`` / ``MistralForCausalLM`` in which every
adapted projection (``config.alter["layers"]``) is a :class:`GatedLoRALinear`: the frozen
``nn.Linear`` (same weight names as a plain checkpoint) plus the ALTER adapter. Per token
(ALTER, Eq. 9 with the extra ``A x`` term removed, as alter-jax's specification corrects it)::

    a = A x                                      A: shared_a [r, d_in]
    z = [x / rms(x); S] W_g,  z_0 += retain_bias W_g: router [d_in + 1, E]
    high entropy (S > θ):  w = top-k(softmax(z / tau_high)), renormalised (ties: lower index)
    low entropy:           w = one_hot(argmax(z / tau_low))
    y = W0 x (+ b) + scale · Σ_e w_e B_e a       B_0 = retain_expert [d_out, r],
                                                 B_1..N = forget_experts [N, d_out, r]

``S`` is the Tsallis entropy ``S_q`` (``q = 1``: Shannon) of the distribution that produced
the token, ``S_t = S_q(softmax(logits[t-1]))``; 0 at position 0, on padding and on the first
real token after left padding:

* scored text and the prompt of ``generate()``: one forward of the frozen backbone (adapters
  off, no gradient) gives every token's entropy (``entropy_source="base"``); with
  ``entropy_source="self"`` a call without a cache then refines it with ``self_iters``
  fixed-point passes of the gated model's own distribution;
* ``prompt_entropy="zero"`` (an alter-jax option, not the default): generate()'s prompt skips
  the backbone forward and every prompt token gets ``S = 0`` (low entropy); scoring is unchanged;
* every generated token: the entropy of the gated model's distribution it was drawn from
  (the previous step's logits, temperature 1, before any sampling filter). It is kept on the
  cache object between decoding steps, so each ``generate()`` call is independent.

``generate(use_cache=False)`` re-scores the whole text at every step, so its generated tokens
get backbone entropies (the scoring rule), not their sampling distribution's.
Decoding steps feed one token at a time (greedy / sampled ``generate()``, pipelines, chat
templates). Not supported: feeding several new tokens on top of a cache (assisted decoding,
continuing a cached conversation) and beam search's cache reordering; both raise or are
documented here rather than silently giving another model.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM

from .configuration_alter import AlterLlamaConfig, AlterMistralConfig

FORMAT = "alter-transformers"
FORMAT_VERSION = 1
_EXPM1_CLAMP = 30.0
_NEXT_ENTROPY = "_alter_next_entropy"  # attribute on the cache object: S of the next token, float32 [B]


# ----------------------------------------------------------------------------- entropy
def tsallis_entropy(logits: torch.Tensor, q: float) -> torch.Tensor:
    """``S_q = (1 - Σ p^q) / (q - 1)`` per position in float32 (``[..., V] -> [...]``); ``q == 1``: Shannon.

    Evaluated as ``-Σ p · expm1((q-1) log p) / (q-1)`` (large exponents for q < 1 as ``p^q - p``).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    if q == 1.0:
        return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    z = (q - 1.0) * logp
    if q > 1.0:
        term = p * torch.expm1(z)
    else:
        term = torch.where(z > _EXPM1_CLAMP, torch.exp(q * logp) - p, p * torch.expm1(torch.clamp(z, max=_EXPM1_CLAMP)))
    return -term.sum(-1) / (q - 1.0)


def token_entropy(logits: torch.Tensor, q: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, V] -> float32 [B, T]``: ``S[:, t] = S_q(softmax(logits[:, t-1]))``, 0 at t = 0,
    on padding and on a token whose predecessor is padding."""
    b = logits.shape[0]
    s = torch.cat([torch.zeros(b, 1, device=logits.device), tsallis_entropy(logits[:, :-1], q)], dim=1)
    if attention_mask is not None:
        m = attention_mask > 0
        prev = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=m.device), m[:, :-1]], dim=1)
        s = torch.where(m & prev, s, torch.zeros_like(s))
    return s


def gate_weights(z: torch.Tensor, high: torch.Tensor, top_k: int, tau_high: float, tau_low: float) -> torch.Tensor:
    """Expert weights ``[B, T, E]`` from router logits ``z`` (Eq. 9): renormalised top-k of
    ``softmax(z / tau_high)`` on high-entropy tokens, one-hot ``argmax(z / tau_low)`` elsewhere."""
    e = z.shape[-1]
    g = torch.softmax(z / tau_high, dim=-1)
    k = min(top_k, e)
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :k]  # ties: lower index first
    g = g * torch.zeros_like(g).scatter(-1, idx, 1.0)
    g = g / g.sum(-1, keepdim=True)
    low = F.one_hot(torch.argmax(z / tau_low, dim=-1), e).to(g.dtype)
    return torch.where(high[..., None], g, low)


class AlterGate:
    """What every gated layer reads during one forward: ``active`` (False = frozen backbone),
    per-token ``entropy`` float32 [B, T] and ``high`` bool [B, T] (None: retain expert only)."""

    def __init__(self):
        self.active = True
        self.entropy: torch.Tensor | None = None
        self.high: torch.Tensor | None = None


class GatedLoRALinear(nn.Linear):
    """``nn.Linear`` (the frozen ``W0``, same parameter names) plus ALTER's adapter (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, gate: AlterGate, settings: dict):
        super().__init__(in_features, out_features, bias=bias)
        r, n = int(settings["rank"]), int(settings["num_forget_experts"])
        self.shared_a = nn.Parameter(torch.zeros(r, in_features))
        self.retain_expert = nn.Parameter(torch.zeros(out_features, r))
        self.forget_experts = nn.Parameter(torch.zeros(n, out_features, r)) if n > 0 else None
        use_router = bool(settings.get("use_router", True)) and n > 0
        self.router = nn.Parameter(torch.zeros(in_features + 1, n + 1)) if use_router else None
        self.scale = float(settings["scale"])
        self.top_k = int(settings["top_k"])
        self.tau_high, self.tau_low = float(settings["tau_high"]), float(settings["tau_low"])
        self.retain_bias = float(settings.get("retain_bias", 0.0))
        self._gate = gate

    def experts(self) -> torch.Tensor:
        """``B [E, d_out, r]``, index 0 the retain expert."""
        b_r = self.retain_expert[None]
        return b_r if self.forget_experts is None else torch.cat([b_r, self.forget_experts], dim=0)

    def router_logits(self, x: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """``[x / rms(x); S] @ W_g + retain_bias·e_0 -> [B, T, E]`` (x detached: no router gradient into x)."""
        x = x.detach().float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6)
        z = torch.cat([x, entropy[..., None].float()], dim=-1) @ self.router.float()
        bias = torch.zeros(z.shape[-1], device=z.device, dtype=z.dtype)
        bias[0] = self.retain_bias
        return z + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        gate = self._gate
        if not gate.active:
            return y
        a = x @ self.shared_a.to(x.dtype).T  # [B, T, r]
        if gate.entropy is None or self.router is None:
            return y + self.scale * (a @ self.retain_expert.to(x.dtype).T)
        experts = self.experts().to(x.dtype)  # [E, d_out, r]
        w = gate_weights(self.router_logits(x, gate.entropy), gate.high, self.top_k, self.tau_high, self.tau_low)
        mixed = (w.to(x.dtype)[..., :, None] * a[..., None, :]).reshape(*a.shape[:-1], -1)  # [B, T, E*r]
        b_flat = experts.transpose(1, 2).reshape(-1, experts.shape[1])  # [E*r, d_out]
        return y + self.scale * (mixed @ b_flat)


def _settings(config) -> dict:
    s = getattr(config, "alter", None)
    if not isinstance(s, dict):
        raise ValueError("config.json has no 'alter' settings; this folder was not written by alter-jax's "
                         "bin/export --format transformers. Export the ALTER run again.")
    if s.get("format") != FORMAT or s.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"config.json 'alter': format {s.get('format')!r} version {s.get('format_version')!r}; this "
                         f"modeling_alter.py reads {FORMAT!r} version {FORMAT_VERSION}. Export the run again.")
    if s.get("entropy_source", "base") not in ("base", "self"):
        raise ValueError(f"config.json 'alter.entropy_source' must be 'base' or 'self', got {s.get('entropy_source')!r}")
    if s.get("prompt_entropy", "base") not in ("base", "zero"):
        raise ValueError(f"config.json 'alter.prompt_entropy' must be 'base' or 'zero', got {s.get('prompt_entropy')!r}")
    return s


class _AlterMixin:
    """The entropy-gated forward on top of a transformers causal LM (module docstring)."""

    def _install_alter(self) -> None:
        s = _settings(self.config)
        self._alter = s
        self._alter_gate = AlterGate()
        for name in s["layers"]:
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name)
            old = getattr(parent, child)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"config.json 'alter.layers' names {name!r}, which is not a linear layer of this model")
            new = GatedLoRALinear(old.in_features, old.out_features, old.bias is not None, self._alter_gate, s)
            new.to(device=old.weight.device, dtype=old.weight.dtype)
            setattr(parent, child, new)

    # the forward's cache argument is ``cache`` in recent transformers 5.x, ``past_key_values`` before
    @classmethod
    def _cache_kw(cls) -> str:
        kw = cls.__dict__.get("_alter_cache_kw")
        if kw is None:
            params = inspect.signature(super(_AlterMixin, cls).forward).parameters
            kw = "cache" if "cache" in params else "past_key_values"
            cls._alter_cache_kw = kw
        return kw

    def _set_gate(self, entropy: torch.Tensor | None, active: bool = True) -> None:
        g = self._alter_gate
        g.active, g.entropy = active, entropy
        g.high = None if entropy is None else entropy > float(self._alter["threshold"])

    def _backbone_entropy(self, input_ids, attention_mask, position_ids, inputs_embeds) -> torch.Tensor:
        """Token entropies from one forward of the frozen backbone (adapters off, no gradient)."""
        self._set_gate(None, active=False)
        try:
            with torch.no_grad():
                logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         inputs_embeds=inputs_embeds, use_cache=False).logits
        finally:
            self._set_gate(None)
        return token_entropy(logits, float(self._alter["q"]), attention_mask)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("the ALTER model needs a 2D attention_mask [B, T] (1 = real token) to place the token "
                             "entropies; use generate() with the default dynamic cache, not a static / compiled one")
        q = float(self._alter["q"])
        past = cache.get_seq_length() if cache is not None else 0
        call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)
        if past == 0 and cache is not None and self._alter.get("prompt_entropy", "base") == "zero":
            # the prompt of generate() without a backbone prefill: S = 0 (low entropy) on every prompt token
            shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            entropy = torch.zeros(shape, dtype=torch.float32, device=self.device)
        elif past == 0:  # a text to score, or the prompt of generate()
            entropy = self._backbone_entropy(input_ids, attention_mask, position_ids, inputs_embeds)
            if self._alter.get("entropy_source", "base") == "self" and cache is None:
                base, real = entropy, (attention_mask > 0 if attention_mask is not None else torch.ones_like(entropy, dtype=torch.bool))
                t = entropy.shape[1]
                iters = self._alter.get("self_iters")
                for _ in range(t - 1 if iters is None else int(iters)):
                    self._set_gate(entropy)
                    own = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                          inputs_embeds=inputs_embeds, use_cache=False).logits
                    entropy = torch.where(real, token_entropy(own, q, attention_mask), base)
        else:  # a decoding step: the entropy of the distribution the new token was drawn from
            n_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            prev = getattr(cache, _NEXT_ENTROPY, None)
            if n_new != 1 or prev is None:
                raise ValueError(
                    "the ALTER model decodes one token per step on a cache it filled itself (got "
                    f"{n_new} new token(s) on a cache of {past}{'' if prev is not None else ' without ALTER entropies'}); "
                    "assisted decoding and continuing a cache from elsewhere are not supported: pass the whole text")
            entropy = prev[:, None].to(torch.float32)
        self._set_gate(entropy)
        try:
            out = super().forward(**{self._cache_kw(): cache}, logits_to_keep=logits_to_keep, **call)
        finally:
            self._set_gate(None)
        new_cache = getattr(out, "cache", None) if hasattr(out, "cache") else None
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        if new_cache is not None:
            setattr(new_cache, _NEXT_ENTROPY, tsallis_entropy(out.logits[:, -1].detach(), q))
        return out


class AlterLlamaForCausalLM(_AlterMixin, LlamaForCausalLM):
    """``LlamaForCausalLM`` with ALTER's entropy-gated adapter (module docstring)."""

    config_class = AlterLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_alter()


class AlterMistralForCausalLM(_AlterMixin, MistralForCausalLM):
    """``MistralForCausalLM`` with ALTER's entropy-gated adapter (module docstring)."""

    config_class = AlterMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_alter()
