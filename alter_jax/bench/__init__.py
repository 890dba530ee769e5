"""Benchmarks behind ``bin/bench``: JAX vs PyTorch forward, train steps, gated generation.

Everything is measured in one process with the two sides of each comparison run
interleaved (``timing.interleaved``), so a ratio compares like with like even on a busy
machine. ``models`` builds the benchmark model (random Llama-shaped weights written once
with transformers, loaded by both sides), ``suites`` holds the three measurements.
"""
