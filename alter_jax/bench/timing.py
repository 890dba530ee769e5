"""Interleaved wall-clock timing: warm-up (compile) measured apart, median of N timed calls.

Each callable must block until its result exists (``jax.block_until_ready`` for JAX;
PyTorch on CPU is synchronous). ``interleaved`` runs one call of every callable per
round, so slow phases of a shared machine hit every side alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable


@dataclasses.dataclass
class Timing:
    """Seconds of one benchmarked callable: the first call (compile + run) and the timed calls."""

    name: str
    warmup_s: float
    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed calls: a noise indicator."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.times_s else float("nan")

    def to_dict(self) -> dict:
        return {"warmup_s": self.warmup_s, "median_s": self.median_s, "min_s": min(self.times_s),
                "max_s": max(self.times_s), "times_s": self.times_s}


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each callable: ``warmup`` untimed-for-the-median calls (the first one's time is
    reported as compile + run), then ``steps`` rounds of one call each, in turn."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = {}
    for name, fn in fns.items():
        first = _time(fn)
        for _ in range(warmup - 1):
            fn()
        out[name] = Timing(name, first, [])
    for _ in range(steps):
        for name, fn in fns.items():
            out[name].times_s.append(_time(fn))
    return out
