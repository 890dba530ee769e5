"""``bin/bench --what device-check`` on CPU with the tiny shape: the CPU-capable parts run, the
accelerator-only parts are skipped with their reason in the JSON (never silently)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_runs_on_cpu_with_the_tiny_shape(tmp_path):
    out = tmp_path / "dc.json"
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "bench"), "--what", "device-check", "--shape", "mfu-tiny",
                           "--steps", "1", "--warmup", "1", "--json", str(out)], capture_output=True, text=True,
                          timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    parts = res["parts"]
    assert res["backend"] == "cpu" and res["ok"] and res["shapes"] == ["mfu-tiny"]
    assert list(parts) == ["logits_parity", "attention_cudnn_vs_xla", "step_mfu-tiny", "memory_mfu-tiny"]
    par = parts["logits_parity"]
    assert par["status"] == "ok" and par["float32"]["max_abs_diff"] < 1e-4 and par["float32"]["argmax_agree"] == 1.0
    assert par["bfloat16"]["rel"] < 5e-2 and par["bfloat16"]["max_abs_diff"] > par["float32"]["max_abs_diff"]
    att = parts["attention_cudnn_vs_xla"]
    assert att["status"] == "skipped" and "CUDA GPU" in att["reason"]
    step = parts["step_mfu-tiny"]
    assert step["status"] == "ok" and step["alter_tokens_per_s"] > 0
    assert step["alter_mfu"] is None and "no peak FLOP/s" in step["mfu_reason"]
    assert {r["name"] for r in step["rows"]} >= {"JAX ALTER step (drift)", "JAX LoRA step"}
    mem = parts["memory_mfu-tiny"]
    assert mem["status"] == "ok" and mem["measured"]["status"] == "skipped" and "memory_stats" in mem["measured"]["reason"]
    assert 0.5 < mem["ratio_planned_over_compiled"] < 2.0, mem
    for name in parts:
        assert name in proc.stdout
    assert "SKIPPED" in proc.stdout
