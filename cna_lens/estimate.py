"""What a run will cost on this machine, said before its heavy stages.

The estimate is a roofline with measured limits: a forward pass over ``T`` tokens costs
``F·T`` FLOP (``F`` = 2 × the matmul parameters a token meets), so a prefill takes
``F·T / (η_c·R)`` seconds at the measured matmul rate ``R`` of the run's dtype; a decoding step of
``B`` rows reads every weight once, so it takes ``max(F·B / (η_c·R), W / (η_m·M))`` with ``W`` the
weight bytes and ``M`` the measured memory bandwidth. The efficiencies ``η`` are what the stock
engine reached on 2-core CPUs in fp32 and bf16 (docs/performance.md); expect ±50 %.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: share of the matmul limit a batched prefill reaches (short chat prompts, batch 16-32)
PREFILL_EFFICIENCY = 0.5
#: share of the compute / memory limit one decoding step reaches (framework overhead included)
DECODE_EFFICIENCY = 0.35


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


def prefill(name: str, flops_per_token: float, tokens: int, limits: Limits) -> Stage:
    """Forward passes over ``tokens`` prompt tokens in all."""
    s = flops_per_token * tokens / (PREFILL_EFFICIENCY * limits.matmul_gflops * 1e9)
    return Stage(name, s, f"{tokens} prompt tokens")


def decode(
    name: str, flops_per_token: float, weight_bytes: int, rows: int, steps: int, batch_size: int, limits: Limits
) -> Stage:
    """Greedy decoding of ``rows`` prompts, ``steps`` tokens each, in batches of ``batch_size`` (the
    prompts' own prefill is small next to ``steps`` decoding steps and is left out)."""
    per_step = []
    for b in _batches(rows, batch_size):
        compute = flops_per_token * b / (limits.matmul_gflops * 1e9)
        memory = weight_bytes / (limits.memory_gbps * 1e9)
        per_step.append(max(compute, memory) / DECODE_EFFICIENCY)
    return Stage(name, steps * sum(per_step), f"{rows} prompts × ≤ {steps} tokens")


def _batches(rows: int, batch_size: int) -> Sequence[int]:
    n = math.ceil(rows / batch_size) if rows else 0
    return [min(batch_size, rows - i * batch_size) for i in range(n)]


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
    lines.append(f"  {'total':<28} ~{_fmt(sum(s.seconds for s in stages)):>7}   (estimate, ±50 %)")
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
