"""What a run will cost on this machine, said before its heavy stages.

The estimate is measured, not modelled: a stage is timed on a small slice of its own work (one
batch of prompts, a few decoding steps) and extrapolated linearly to the whole stage, so it
includes the framework's overhead and whatever else the machine is running. The machine's matmul
rate and memory bandwidth are printed beside it, with the reason for fp32 or bf16. A roofline from
those limits alone underestimated the 1.5B's discovery several-fold on a shared 2-core machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Limits:
    """This machine's measured limits for one dtype."""

    dtype: str
    matmul_gflops: float
    memory_gbps: float
    native_bf16: bool


def measure(dtype: torch.dtype, seconds: float = 0.25) -> Limits:
    """Median timings of a 1024² matmul in ``dtype`` and of a 256 MB read over ~``seconds`` each.

    The median, not the best, so that a machine shared with other work is estimated as it runs now."""
    from .models import native_bf16

    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    x = torch.ones(64 * 2**20)
    return Limits(
        str(dtype).removeprefix("torch."),
        2 * 1024**3 / _median_time(lambda: a @ b, seconds) / 1e9,
        x.numel() * 4 / _median_time(x.sum, seconds) / 1e9,
        native_bf16("cpu"),
    )


def _median_time(fn, seconds: float) -> float:
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    detail: str


def extrapolate(name: str, seconds_per_unit: float, units: float, detail: str) -> Stage:
    """A stage of ``units`` pieces of work, each measured at ``seconds_per_unit``."""
    return Stage(name, seconds_per_unit * units, detail)


def timed(fn) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(stages: Sequence[Stage], limits: Limits) -> str:
    """A few lines for the terminal: the machine's limits, then each stage with its estimate."""
    why = (
        "bf16: this CPU runs it natively"
        if limits.dtype == "bfloat16"
        else "fp32" + ("" if limits.native_bf16 else ": this CPU has no native bf16 (avx512_bf16/AMX)")
    )
    lines = [
        f"this machine: {limits.matmul_gflops:.0f} GFLOP/s {limits.dtype} matmul, {limits.memory_gbps:.0f} GB/s "
        f"memory, {torch.get_num_threads()} threads ({why})"
    ]
    lines += [f"  {s.name:<28} ~{_fmt(s.seconds):>7}   {s.detail}" for s in stages]
    lines.append(f"  {'total':<28} ~{_fmt(sum(s.seconds for s in stages)):>7}   (measured on a slice, extrapolated)")
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
