"""Every shipped config file builds and passes validation (issue 14: two WMDP configs did not even parse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alter_jax.cli.common import build_run_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds(path):
    run = build_run_config(path, [])
    assert run.output_dir.startswith("runs/") and run.train.epochs >= 1
