"""issue 14: "PyTorch was not found" was printed on every command where torch is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_TORCH = "import sys; sys.modules['torch'] = None; "  # importlib.util.find_spec('torch') is then None


def _stderr(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, env=env,
                          timeout=120).stderr


def test_no_pytorch_message_without_torch():
    assert "PyTorch was not found" in _stderr("import transformers")  # the message exists without us
    assert "PyTorch was not found" not in _stderr("import alter_jax, transformers; import alter_jax.io.hf")
