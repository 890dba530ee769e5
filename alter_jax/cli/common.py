"""Shared command-line plumbing: Python config files with ``--config.a.b=value`` overrides.

A config file defines ``get_config() -> ml_collections.ConfigDict``. Overrides are
parsed as Python literals where possible (``--config.optim.lr_b=5e-4``,
``--config.adapter.target_modules=q_proj,v_proj``) and type-checked against the
existing value; every error names the key and the valid choices and is raised before
any work starts.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

from ml_collections import ConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.py"


class CliError(SystemExit):
    """Exit with a one-line message on stderr (no traceback)."""

    def __init__(self, msg: str, code: int = 2):
        print(f"error: {msg}", file=sys.stderr)
        super().__init__(code)


def load_config_file(path: str | Path) -> ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"config file {path} not found (see configs/ for examples)")
    spec = importlib.util.spec_from_file_location(f"_alter_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's Python file
        raise CliError(f"{path}: cannot be executed ({type(e).__name__}: {e})") from None
    if not hasattr(module, "get_config"):
        raise CliError(f"{path}: defines no get_config() function returning an ml_collections.ConfigDict")
    cfg = module.get_config()
    if not isinstance(cfg, ConfigDict):
        cfg = ConfigDict(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Apply ``config.a.b=value`` strings (the leading ``--`` already removed)."""
    cfg = ConfigDict(cfg.to_dict())  # typed copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CliError(f"override --{item} needs a value: --{key}=VALUE")
        parts = key.split(".")[1:]
        node = cfg
        for i, p in enumerate(parts[:-1]):
            if p not in node:
                valid = ", ".join(sorted(node.keys()))
                raise CliError(f"unknown config key {'.'.join(['config', *parts[: i + 1]])}; valid keys here: {valid}")
            node = node[p]
        leaf = parts[-1] if parts else ""
        if leaf not in node:
            raise CliError(f"unknown config key {key}; valid keys here: {', '.join(sorted(node.keys()))}")
        value = _parse_value(raw)
        old = node[leaf]
        if isinstance(old, (list, tuple)) and isinstance(value, str):
            value = type(old)(v.strip() for v in value.split(",") if v.strip())
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = raw
        if old is not None and type(old) is not type(value) and not (isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))):
            raise CliError(f"{key}={raw!r}: expected {type(old).__name__} (current value {old!r})")
        node[leaf] = value
    return cfg


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.x=y`` overrides from the other arguments."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config.") and "=" not in a:  # "--config.optim.lr_b 5e-4": the value is the next word
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise CliError(f"override {a} needs a value: {a}=VALUE (or {a} VALUE)")
            overrides.append(f"{a[2:]}={argv[i + 1]}")
            i += 2
            continue
        if a.startswith("--config."):
            overrides.append(a[2:])
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def with_defaults(cfg: ConfigDict) -> ConfigDict:
    """The file's values over every default of :class:`alter_jax.config.RunConfig`, so any
    valid key can be overridden (unknown keys in the file are kept and rejected by build)."""
    import dataclasses

    from alter_jax import config as C

    merged = dataclasses.asdict(C.RunConfig())
    for section, value in cfg.to_dict().items():
        if isinstance(value, dict) and isinstance(merged.get(section), dict):
            merged[section].update(value)
        else:
            merged[section] = value
    return ConfigDict(merged)


def build_run_config(config_path: str | Path, overrides: Sequence[str]):
    from alter_jax import config as C

    cfg = apply_overrides(with_defaults(load_config_file(config_path)), overrides)
    try:
        return C.build(cfg)
    except C.ConfigValueError as e:
        raise CliError(f"{config_path}: {e}") from None
