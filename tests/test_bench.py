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
        "merged generate (expert 0)", "gated prefill only (1 new token)", "merged prefill only (1 new token)",
        "gated generate, prompt S = 0"]
RATIOS = ["JAX / PyTorch forward tokens/s", "(a) JAX ALTER / PyTorch LoRA time", "(a) JAX LoRA / PyTorch LoRA time",
          "(b) JAX ALTER / JAX LoRA time", "(b) JAX ALTER (struct none) / JAX LoRA time",
          "(b) JAX AsymLoRA / JAX LoRA time", "(c) gated / merged generation tokens/s",
          "(c) gated, prompt S = 0 (no backbone prefill) / merged"]


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
                         (["--model", "/no/such/folder"], "--model /no/such/folder"),
                         (["--what", "mfu", "--shape", "llama-70b"], "--shape 'llama-70b': choose from llama-1b"),
                         (["--what", "mfu", "--shape", "mfu-tiny", "--seq", "5000"], "exceeds mfu-tiny's")):
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


def test_mfu_suite_reports_tflops_and_mfu_against_the_given_peak(tmp_path):
    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "bench"), "--what", "mfu", "--shape", "mfu-tiny",
                           "--dtype", "float32", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1",
                           "--peak-tflops", "0.5", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["rows"]] == ["JAX ALTER step (drift)", "JAX LoRA step", "PyTorch+PEFT LoRA step"]
    flops = res["extra"]["model_tflops_per_step"] * 1e12
    for r in res["rows"]:  # MFU = model FLOPs / (median step time x peak)
        assert r["mfu"] == pytest.approx(flops / r["median_s"] / 0.5e12, rel=1e-9)
    ratios = {r["name"]: r for r in res["ratios"]}
    assert ratios["(d) JAX ALTER step MFU (mfu-tiny)"]["goal"] == ">= 0.4"
    assert res["extra"]["forward_tflops_xla"] == pytest.approx(res["extra"]["forward_tflops_analytic"], rel=0.05)
    assert "MFU" in proc.stdout


def test_step_flops_convention_and_named_shapes():
    from alter_jax.bench.mfu import forward_flops, peak_flops, shape_config, step_flops

    cfg = shape_config("llama2-7b")
    assert cfg.num_params() == 6_738_415_616  # Llama-2-7B's published parameter count
    assert shape_config("llama-1b").num_params() == 1_235_814_400  # Llama-3.2-1B (tied embeddings)
    linear, attention = forward_flops(cfg, 1, 4096)
    # 2 FLOPs per matmul parameter per token (embedding lookup excluded, LM head included)
    assert linear == 2 * (cfg.num_params() - 2 * 32000 * 4096 + 32000 * 4096 - 4096 - 32 * 2 * 4096) * 4096
    assert attention == 4 * 32 * 4096 * 4096 * 4096
    assert step_flops(cfg, 1, 4096) == 2 * linear + 3 * attention
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None and peak_flops("cpu", 1.5) == 1.5e12
    with pytest.raises(ValueError, match="choose from llama-1b"):
        shape_config("gpt2")
