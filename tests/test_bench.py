"""bin/bench end to end on the tiny preset (1 timed step), and its small pieces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alter_jax.bench.timing import interleaved

REPO = Path(__file__).resolve().parents[1]
ROWS = ["JAX forward (jit)", "PyTorch forward (no_grad)", "JAX ALTER step (drift)", "JAX ALTER step (struct none)",
        "JAX AsymLoRA step (A frozen)", "JAX LoRA step", "PyTorch+PEFT LoRA step", "gated generate (Eq. 9)",
        "merged generate (expert 0)", "gated prefill only (1 new token)", "merged prefill only (1 new token)"]
RATIOS = ["JAX / PyTorch forward tokens/s", "(a) JAX ALTER / PyTorch LoRA time", "(a) JAX LoRA / PyTorch LoRA time",
          "(b) JAX ALTER / JAX LoRA time", "(b) JAX ALTER (struct none) / JAX LoRA time",
          "(b) JAX AsymLoRA / JAX LoRA time", "(c) gated / merged generation tokens/s"]


def test_bench_runs_every_row_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "bench"), "--model", "tiny", "--steps", "1", "--warmup", "1",
                           "--seq", "16", "--new-tokens", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ROWS + RATIOS:
        assert name in proc.stdout, (name, proc.stdout)
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["rows"]] == ROWS
    for r in res["rows"]:
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0 and len(r["times_s"]) == 1
    ratios = {r["name"]: r for r in res["ratios"]}
    assert set(RATIOS) <= set(ratios)
    assert ratios["(a) JAX ALTER / PyTorch LoRA time"]["goal"] == "<= 0.7"
    assert all(r["value"] > 0 for r in res["ratios"])
    assert res["extra"]["forward_max_abs_logit_diff"] < 1e-4  # both sides ran the same weights
    assert res["settings"]["import_order"] == "torch first"


def test_bad_arguments_are_one_line_errors():
    for argv, needle in ((["--what", "forward,speed"], "unknown part(s) ['speed']"),
                         (["--batch", "1", "--what", "step"], "--batch must be >= 2"),
                         (["--model", "/no/such/folder"], "--model /no/such/folder")):
        proc = subprocess.run([sys.executable, str(REPO / "bin" / "bench"), *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_interleaved_timing_alternates_and_reports_the_first_call_apart():
    calls = []
    res = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=3, warmup=2)
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert len(res["a"].times_s) == 3 and res["a"].warmup_s >= 0 and res["b"].median_s >= 0
    with pytest.raises(ValueError, match="steps must be >= 1"):
        interleaved({"a": lambda: None}, steps=0)
