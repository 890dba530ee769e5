"""Hugging Face checkpoints in and out: a model folder or hub id <-> NNX :class:`Transformer`.

One key-mapping table (:data:`KEY_MAP`) names every checkpoint tensor, so loading,
export and the sharding rules agree on names. Tensors are read one at a time with
``safetensors.safe_open`` and moved to the device before the next is read, so the host
never holds a second full copy of the model.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from alter_jax.models.config import ConfigError, ModelConfig
from alter_jax.models.llama import Transformer


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names file and fix."""


# HF tensor name (regex) -> (our state path template, transpose?). Linear weights are
# [out, in] in PyTorch and [in, out] here.
KEY_MAP: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    (r"model\.embed_tokens\.weight", ("embed_tokens",), False),
    (r"model\.norm\.weight", ("norm", "weight"), False),
    (r"lm_head\.weight", ("lm_head",), True),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", ("layers", "{0}", "{1}", "weight"), False),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight", ("layers", "{0}", "{1}", "{2}", "kernel"), True),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", ("layers", "{0}", "{1}", "{2}", "bias"), False),
)
IGNORED_KEYS = (r".*rotary_emb\.inv_freq",)
WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def hf_to_path(key: str) -> tuple[tuple[str | int, ...], bool] | None:
    """Map a HF tensor name to (our state path, transpose?); None for ignored buffers."""
    for pattern, template, transpose in KEY_MAP:
        m = re.fullmatch(pattern, key)
        if m:
            path = tuple(p.format(*m.groups()) for p in template)
            return tuple(int(p) if p.isdigit() else p for p in path), transpose
    if any(re.fullmatch(p, key) for p in IGNORED_KEYS):
        return None
    raise CheckpointError(f"unknown tensor {key!r}: not a Llama/Mistral weight name (see alter_jax.io.hf.KEY_MAP).")


def path_to_hf(path: tuple) -> tuple[str, bool]:
    """Inverse of :func:`hf_to_path`."""
    p = tuple(str(x) for x in path)
    if p == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    if p == ("norm", "weight"):
        return "model.norm.weight", False
    if p == ("lm_head",):
        return "lm_head.weight", True
    if p[0] == "layers" and p[-1] == "weight":
        return f"model.layers.{p[1]}.{p[2]}.weight", False
    if p[0] == "layers" and p[-1] in ("kernel", "bias"):
        return f"model.layers.{p[1]}.{p[2]}.{p[3]}.{'weight' if p[-1] == 'kernel' else 'bias'}", p[-1] == "kernel"
    raise KeyError(f"no Hugging Face name for parameter {path}")


# ----------------------------------------------------------------------------- resolving
def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as is; anything else through the registry (friendly names, GGUF
    files, hub ids via ``huggingface_hub.snapshot_download``)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    from alter_jax.models.registry import resolve_model  # registry handles names, .gguf and hub ids

    return Path(resolve_model(str(name_or_path)))


def _weight_files(folder: Path, *, allow_pickle: bool) -> list[Path]:
    index = folder / WEIGHT_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e!r}); it must hold a 'weight_map'. Re-download the model.") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}. Re-download the model.")
        return files
    single = folder / WEIGHT_FILE
    if single.exists():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: only PyTorch pickle weights ({pickles[0].name}) found. Pickle files can run arbitrary "
                "code when loaded, so alter-jax refuses them by default. Convert them to safetensors "
                "(transformers: model.save_pretrained(dir, safe_serialization=True)) or pass allow_pickle=True "
                "if you trust the file."
            )
        return pickles
    raise CheckpointError(f"{folder}: no weights found (expected {WEIGHT_FILE} or {WEIGHT_INDEX} with its shards).")


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time from safetensors (or, if allowed, pickle) files."""
    for f in files:
        if f.suffix in (".bin", ".pt"):
            try:
                import torch
            except ImportError:
                raise CheckpointError(f"{f}: loading pickle weights needs torch (pip install 'alter-jax[test]').") from None
            sd = torch.load(f, map_location="cpu", weights_only=True)
            for k, v in sd.items():
                yield k, v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            continue
        try:
            with safe_open(str(f), framework="numpy") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e}). The file is corrupt or truncated; re-download it.") from None


# ----------------------------------------------------------------------------- loading
def load_config(folder: str | os.PathLike, **overrides) -> ModelConfig:
    return ModelConfig.from_json(Path(folder) / "config.json", **overrides)


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    allow_pickle: bool = False,
    sharding_fn: Callable[[tuple, jax.ShapeDtypeStruct], Any] | None = None,
    revision: str | None = None,
    **config_overrides,
) -> Transformer:
    """Load a HF model folder, hub id or registry name into a frozen :class:`Transformer`.

    dtype: computation dtype; param_dtype: storage dtype (default: ``dtype``).
    sharding_fn(path, abstract) -> a ``jax.sharding.Sharding`` for each parameter, so that a
    sharded model is placed shard by shard (see ``alter_jax.sharding``).
    """
    folder = resolve_model_dir(name_or_path, revision=revision)
    cfg = load_config(folder, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    files = _weight_files(folder, allow_pickle=allow_pickle)

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    loaded: set[tuple] = set()
    for key, array in iter_checkpoint(files):
        mapped = hf_to_path(key)
        if mapped is None:
            continue
        path, transpose = mapped
        if path not in flat:
            if path == ("lm_head",) and cfg.tie_word_embeddings:
                continue  # some tied checkpoints still store the head
            raise CheckpointError(f"{folder}: tensor {key!r} does not fit a {cfg.model_type} model of this config.")
        value = array.T if transpose else array
        target = flat[path]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{folder}: tensor {key!r} has shape {tuple(array.shape)}, config.json implies "
                f"{tuple(target.shape)[::-1] if transpose else tuple(target.shape)}. The config and weights disagree."
            )
        value = np.asarray(value).astype(target.dtype)
        sharding = sharding_fn(path, target) if sharding_fn else None
        flat[path] = target.replace(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
        loaded.add(path)
    missing = sorted(".".join(map(str, p)) for p in flat if p not in loaded)
    if missing:
        raise CheckpointError(f"{folder}: weights missing for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_tokenizer(name_or_path: str | os.PathLike):
    """``transformers.AutoTokenizer`` from the (resolved) model folder."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types here
        raise CheckpointError(f"{folder}: cannot load a tokenizer ({e}).") from None


# ----------------------------------------------------------------------------- export
def backbone_tensors(model: Transformer, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named numpy tensors of the model's backbone parameters."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not all(isinstance(p, (str, int)) for p in path) or "adapter" in path:
            continue
        name, transpose = path_to_hf(path)
        arr = np.asarray(jax.device_get(var[...]))
        arr = arr.T if transpose else arr
        yield name, np.ascontiguousarray(arr.astype(dtype) if dtype else arr)


def atomic_dir(out_dir: Path):
    """Context manager: yields a temp folder beside ``out_dir`` and renames it into place on success."""
    import contextlib

    @contextlib.contextmanager
    def _cm():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            yield tmp
            mask = os.umask(0o022)
            os.umask(mask)
            tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700 folders; honour the user's umask
            if out_dir.exists():
                old = out_dir.with_name(out_dir.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                out_dir.rename(old)
                tmp.rename(out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return _cm()


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
    config: dict | None = None,
    extra_tensors: Iterable[tuple[str, np.ndarray]] = (),
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a HF folder (config.json, safetensors, optional tokenizer) that transformers loads.

    ``tokenizer``: a transformers tokenizer (saved with its ``save_pretrained``) or a model
    folder whose tokenizer files are copied unchanged (:func:`copy_tokenizer_files`; no
    transformers import). With ``max_shard_bytes`` the weights are split into shards with a
    ``model.safetensors.index.json``. The folder appears atomically. ``config`` replaces the
    backbone's ``config.json`` dict; ``extra_tensors`` (name, array) are stored after the
    backbone's; ``extra_files(tmp_folder)`` writes more files before the folder appears
    (used by :mod:`alter_jax.io.transformers_export`).
    """
    out_dir = Path(out_dir)
    cfg = model.cfg if dtype is None else model.cfg.replace(param_dtype=dtype)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict() if config is None else config, indent=2))
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in itertools.chain(backbone_tensors(model, dtype), extra_tensors):
            if max_shard_bytes and size + arr.nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHT_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(a.nbytes for s in shards for a in s.values())
            (tmp / WEIGHT_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if isinstance(tokenizer, (str, os.PathLike)):
            copy_tokenizer_files(tokenizer, tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra_files is not None:
            extra_files(tmp)
    return out_dir


#: Files a Hugging Face tokenizer is saved as (fast and slow tokenizers, chat templates).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (:data:`TOKENIZER_FILES`) of model folder ``src`` into ``dst``;
    returns the names copied. Byte-identical to the source, and ~3 s faster than loading the
    tokenizer with transformers only to save it again."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
