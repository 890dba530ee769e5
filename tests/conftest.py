"""Shared test fixtures.

`shared_dir` / `tofu_dir` point at ../shared beside the repository. Tests that need it
fail (not skip) when CI=true and the data is missing, so that CI never counts a skipped
data test as a pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("ALTER_SHARED_DIR", REPO_ROOT.parent / "shared"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"shared data not found at {path} (set ALTER_SHARED_DIR or put ../shared beside the repo)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR)


@pytest.fixture(scope="session")
def tofu_dir() -> Path:
    return _require(SHARED_DIR / "data" / "tofu")
