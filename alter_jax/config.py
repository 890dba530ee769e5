"""Typed configuration: one frozen dataclass per concern, built from an ml_collections ConfigDict.

A config file (``configs/*.py``) defines ``get_config() -> ConfigDict`` with the sections
below; :func:`build` validates every key and type against these dataclasses and fails
before any work with the valid choices named.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from alter_jax.adapters.lora import AdapterConfig


TRUNCATION_LIMIT = 0.02  # fraction of rows per side that may be cut by model.max_length without allow_truncation


class ConfigValueError(ValueError):
    """A config key or value that cannot be used; the message names it and the valid choices."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str = "tiny-random"  # HF folder, hub id, registry name or .gguf; "tiny-random" builds one
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "xla"  # xla | cudnn (GPU, bfloat16) | auto
    prompt_format: str = "auto"
    max_length: int = 128
    # each batch (training, entropy pre-pass, evaluation) is padded to the next multiple of this that
    # holds its longest row, not to max_length: a few static widths, one compile each (0 = max_length)
    length_bucket: int = 32
    # the LM head runs only at scored positions; > 0 evaluates it in blocks of this many positions per
    # row under jax.checkpoint (recomputed in the backward pass): at most [B, head_chunk, V] logits live
    head_chunk: int = 0
    # run the decoder layers as one lax.scan (one layer body traced instead of num_layers; costs one copy of
    # the layer weights per step, which the memory plan counts). Off: measured on SmolLM2 it did not pay
    # (steps 5-8 % slower, XLA compile time unchanged; WORKSPACE decision log)
    scan_layers: bool = False


@dataclasses.dataclass(frozen=True)
class EntropyConfig:
    q: float = 1.0  # Tsallis q (1 = Shannon); the paper gives no value
    threshold: str = "fixed"  # fixed | quantile | bimodal
    value: float = 1.2  # fixed: θ; quantile: fraction of tokens that are high-entropy
    inference_source: str = "base"  # base (backbone prefill) | self (the sampling distribution)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    beta: float = 1.0  # forget term weight (ALTER β)
    gamma: float = 1.0  # retain term weight (ALTER γ)
    lambda_struct: float = 0.01  # structural invariance weight (ALTER λ)
    mu_route: float = 1.0  # routing loss weight
    struct_penalty: str = "drift"  # drift | grad (double backprop) | none
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_gamma: float = 0.0
    retain_loss: str = ""  # override the method's retain loss: nll | kl ("" = method default)
    # RMU (Li et al. 2024): steer the output of decoder layer rmu_layer (0-based) on forget tokens to
    # rmu_steering · u (u a fixed random unit vector); gamma weighs the retain term (RMU's alpha)
    rmu_layer: int = 7
    rmu_steering: float = 6.5
    # IdkDPO (open-unlearning configs/trainer/DPO.yaml): β of -(2/β) log σ(β (ρ_idk − ρ_true))
    dpo_beta: float = 0.1
    # ALTER / AsymLoRA forget-expert target: "ihl" (the paper: inverse hinge on low-entropy forget tokens) or
    # "idk" (beyond the paper: NLL of an "I don't know" answer from <data>/idontknow.jsonl on every answer
    # token of the forget question, so that forgotten questions are answered with a refusal)
    forget_target: str = "ihl"
    # beyond the paper (issue 19): weight of an NLL term on the HIGH-entropy answer tokens of forget rows,
    # owned by the forget experts (a B-term; the spec gives them only IHL on low-entropy tokens, so at
    # high-entropy positions the forget expert is untrained). 0 = the spec
    forget_high_nll: float = 0.0
    # beyond the paper (issue 19): IHL as a hinge with margin m, max(0, p_t − max_{v≠t} p_v + m); it stops
    # pushing a token once another leads it by m (IHL_t = 1 + p_t − max p_v is the m = 1 case, the spec's)
    ihl_margin: float = 1.0
    rmu_params: str = ""  # regex over parameter paths ('layers.5.mlp.down_proj.kernel'); "" = the
    # down_proj kernels of layers rmu_layer-2 .. rmu_layer, as in the WMDP reference code


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5  # full-parameter and plain-LoRA methods
    lr_a: float = 1e-5  # ALTER η_A
    lr_b: float = 1e-3  # ALTER η_B (retain and forget experts)
    lr_router: float = 1e-2
    lr_phase1: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    clip_norm: float = 0.0  # 0 = no clipping


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "qa"  # qa (TOFU-style question/answer rows) | text (plain corpora: WMDP, MUSE)
    source: str = "synthetic"  # synthetic | demo | locuslab/TOFU | a local folder | a hub id
    forget_split: str = "forget01"
    retain_split: str = "retain99"
    num_forget: int = 0  # 0 = all rows of the split
    num_retain: int = 0
    synthetic_authors: int = 8
    synthetic_forget_authors: int = 2
    domain_field: str = "domain"  # sub-domain labels if the rows have them
    num_subdomains: int = 0  # 0 = choose by silhouette over [2, max_subdomains]
    max_subdomains: int = 4
    # rows whose prompt + answer exceed model.max_length lose the end of their answer: counted and
    # warned about; more than TRUNCATION_LIMIT of a side is refused unless this is true
    allow_truncation: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "alter"
    epochs: int = 3
    batch_size: int = 4
    phase1_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    max_steps: int = 0  # 0 = epochs decide


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 48
    num_questions: int = 0  # 0 = all


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSpec = ModelSpec()
    adapter: AdapterConfig = AdapterConfig()
    entropy: EntropyConfig = EntropyConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs/default"


CHOICES = {
    ("entropy", "threshold"): ("fixed", "quantile", "bimodal"),
    ("entropy", "inference_source"): ("base", "self"),
    ("loss", "struct_penalty"): ("drift", "grad", "none"),
    ("loss", "retain_loss"): ("", "nll", "kl"),
    ("loss", "forget_target"): ("ihl", "idk"),
    ("data", "kind"): ("qa", "text"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("model", "attention_impl"): ("xla", "cudnn", "auto"),
    ("model", "param_dtype"): ("float32", "bfloat16", "float16"),
}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(f"config.{where}: expected a list, got {value!r}")
        return tuple(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigValueError(f"config.{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(f"config.{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError(f"config.{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigValueError(f"config.{where}: expected a string, got {value!r}")
        return value
    return value


def _build_section(cls, values: dict, section: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigValueError(
            f"config.{section}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(fields))}."
        )
    kw = {}
    for k, v in values.items():
        kw[k] = _coerce(v, hints[k], f"{section}.{k}")
        choices = CHOICES.get((section, k))
        if choices is not None and kw[k] not in choices:
            raise ConfigValueError(f"config.{section}.{k} = {kw[k]!r}; choose one of {', '.join(map(repr, choices))}.")
    return cls(**kw)


def build(cfg: Any) -> RunConfig:
    """Validate a ConfigDict (or plain dict) and build the typed :class:`RunConfig`."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    hints = typing.get_type_hints(RunConfig)
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigValueError(f"config: unknown section(s) {', '.join(unknown)}; valid are {', '.join(sorted(sections))}.")
    kw = {}
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigValueError(f"config.{name}: expected a section (dict), got {value!r}")
            kw[name] = _build_section(typ, value, name)
        else:
            kw[name] = _coerce(value, typ, name)
    run = RunConfig(**kw)
    from alter_jax.train.methods import METHODS

    if run.train.method not in METHODS:
        raise ConfigValueError(f"config.train.method = {run.train.method!r}; choose one of {', '.join(METHODS)}.")
    check_ranges(run)
    return run


# (section, key, lower bound, inclusive, why): values outside make a run crash late (ZeroDivisionError),
# train nothing (epochs 0 saves the untrained adapter as the result) or destroy the model (lr < 0).
_RANGES = (
    ("adapter", "rank", 1, True, "the LoRA rank r"),
    ("adapter", "alpha", 0.0, False, "the LoRA scale alpha / r"),
    ("adapter", "top_k", 1, True, "experts kept per token"),
    ("train", "epochs", 1, True, "epochs 0 would save the untrained adapter as the result"),
    ("train", "batch_size", 1, True, "forget (and as many retain) rows per step"),
    ("train", "checkpoint_every", 1, True, "steps between checkpoints"),
    ("train", "log_every", 1, True, "steps between log lines"),
    ("train", "max_steps", 0, True, "0 = the epochs decide"),
    ("train", "phase1_steps", 0, True, "0 = no phase I"),
    ("optim", "grad_accum", 1, True, "micro-batches per step"),
    ("optim", "warmup_steps", 0, True, "linear warm-up steps"),
    ("optim", "clip_norm", 0.0, True, "0 = no clipping"),
    ("optim", "weight_decay", 0.0, True, "AdamW decay"),
    ("entropy", "q", 0.0, False, "the Tsallis order (1 = Shannon)"),
    ("loss", "dpo_beta", 0.0, False, "IdkDPO's inverse temperature (open-unlearning: 0.1)"),
    ("loss", "forget_high_nll", 0.0, True, "weight of the forget experts' NLL on high-entropy forget tokens; 0 = off"),
    ("loss", "ihl_margin", 0.0, False, "IHL hinge margin in (0, 1]; 1 = the paper's IHL"),
    ("model", "max_length", 2, True, "tokens per row (prompt + answer)"),
    ("model", "length_bucket", 0, True, "batch widths are multiples of it; 0 = always max_length"),
    ("model", "head_chunk", 0, True, "scored positions per LM-head block; 0 = all at once"),
    ("data", "num_forget", 0, True, "0 = all rows"),
    ("data", "num_retain", 0, True, "0 = all rows"),
    ("data", "num_subdomains", 0, True, "0 = chosen by silhouette"),
    ("data", "max_subdomains", 2, True, "the silhouette search range is [2, max_subdomains]"),
    ("eval", "batch_size", 1, True, "rows per evaluation batch"),
    ("eval", "max_new_tokens", 1, True, "tokens generated per answer"),
    ("eval", "num_questions", 0, True, "0 = all"),
    ("mesh", "data", 1, True, "devices on the data axis"),
    ("mesh", "fsdp", 1, True, "devices on the fsdp axis"),
    ("mesh", "tensor", 1, True, "devices on the tensor axis"),
)


def check_ranges(run: RunConfig) -> None:
    """Value ranges that the types cannot express (issue 14); each error names the key, the value,
    the valid range and why."""
    for section, key, low, inclusive, why in _RANGES:
        v = getattr(getattr(run, section), key)
        if not (v >= low if inclusive else v > low) or v != v:
            raise ConfigValueError(f"config.{section}.{key} = {v!r}; it must be {'>=' if inclusive else '>'} {low} ({why}).")
    for key in ("lr", "lr_a", "lr_b", "lr_router", "lr_phase1"):
        v = getattr(run.optim, key)
        if not v >= 0 or v == float("inf"):
            raise ConfigValueError(f"config.optim.{key} = {v!r}; a learning rate must be a finite number > 0 (a negative "
                                   "one ascends the loss and destroys the model).")
    from alter_jax.train.methods import METHODS

    m = METHODS[run.train.method]
    main = ("lr_b",) if m.asymmetric else ("lr",)  # lr_a = 0 (A frozen) and lr_router = 0 stay possible ablations
    if m.phase1 and run.train.phase1_steps > 0:
        main += ("lr_phase1",)
    for key in main:
        if getattr(run.optim, key) == 0:
            raise ConfigValueError(f"config.optim.{key} = 0: method {m.name!r} trains with it, so nothing would change; "
                                   "give a learning rate > 0 (e.g. 1e-3 for lr_b, 1e-5 for lr / lr_a).")
    e = run.entropy
    if e.threshold == "quantile" and not 0.0 < e.value < 1.0:
        raise ConfigValueError(f"config.entropy.value = {e.value!r} with threshold 'quantile' is the fraction of answer "
                               "tokens that are high-entropy; it must lie strictly between 0 and 1 (e.g. 0.3).")
    if e.threshold == "fixed":
        if not (e.value >= 0 and e.value != float("inf")):
            raise ConfigValueError(f"config.entropy.value = {e.value!r}: the fixed threshold θ must be a finite number >= 0.")
        if e.q > 1.0 and e.value >= 1.0 / (e.q - 1.0):
            raise ConfigValueError(
                f"config.entropy.value = θ = {e.value:g} is unreachable with config.entropy.q = {e.q:g}: Tsallis entropy "
                f"satisfies S_q < 1/(q-1) = {1.0 / (e.q - 1.0):g}, so no token would be high-entropy. Lower q below "
                f"{1.0 + 1.0 / e.value:.3g} if θ > 0, lower θ, or use config.entropy.threshold=quantile (value 0.3).")
    if not m.asymmetric and (run.loss.forget_target != "ihl" or run.loss.forget_high_nll or run.loss.ihl_margin != 1.0):
        raise ConfigValueError(f"config.loss.forget_target / forget_high_nll / ihl_margin shape ALTER's forget experts; "
                               f"method {m.name!r} has none. Use them with alter / asymlora, or the idk_nll / idk_dpo "
                               "methods for 'I don't know' answers.")
    if run.loss.ihl_margin > 1.0:
        raise ConfigValueError(f"config.loss.ihl_margin = {run.loss.ihl_margin!r}; the IHL hinge margin lies in (0, 1] "
                               "(1 = the paper's IHL, 1 + p_t − max p_v, which is never below 0).")
    if run.data.num_subdomains and run.data.num_forget and run.data.num_subdomains > run.data.num_forget:
        raise ConfigValueError(f"config.data.num_subdomains = {run.data.num_subdomains} exceeds config.data.num_forget = "
                               f"{run.data.num_forget} forget rows; each sub-domain needs at least one row (0 = choose "
                               "by silhouette).")


def to_dict(run: RunConfig) -> dict:
    return dataclasses.asdict(run)
