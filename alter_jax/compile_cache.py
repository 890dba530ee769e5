"""JAX's persistent compilation cache, on by default under the user's cache folder.

A rerun, a resume or a second process with the same shapes then loads the compiled step
instead of compiling it again (on CPU, GPU and TPU). The folder is
``$ALTER_JAX_COMPILATION_CACHE`` if set (``0`` / ``off`` disables the cache), else
``<cache>/xla`` with ``<cache>`` = ``$ALTER_JAX_CACHE`` or ``~/.cache/alter_jax``.
An explicit ``jax_compilation_cache_dir`` set by the user (``JAX_COMPILATION_CACHE_DIR``
or ``jax.config``) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Programs that compile faster than this are not written (the cache would fill with
#: tiny helpers); the train and evaluation steps take seconds.
MIN_COMPILE_SECONDS = 0.3


def compilation_cache_dir() -> Path | None:
    """The folder the cache should use, or ``None`` when disabled by the environment."""
    env = os.environ.get("ALTER_JAX_COMPILATION_CACHE")
    if env is not None and env.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    if env:
        return Path(env).expanduser()
    from alter_jax.models.registry import default_cache_dir

    return default_cache_dir() / "xla"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`compilation_cache_dir` (idempotent).
    Returns the folder in use, or ``None`` when the cache is off."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    folder = compilation_cache_dir()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
