"""The run-time estimate: roofline arithmetic, and what it tells the user on either CPU class."""

import pytest
import torch

from cna_lens import estimate
from cna_lens.estimate import Limits


def test_prefill_is_flops_over_rate():
    lim = Limits("float32", 100.0, 10.0, False)
    s = estimate.prefill("discovery", 2e9, 1000, lim)  # 2e12 FLOP at 0.5 × 100 GFLOP/s
    assert s.seconds == pytest.approx(2e12 / (estimate.PREFILL_EFFICIENCY * 100e9))


def test_decode_takes_the_slower_of_compute_and_memory():
    lim = Limits("float32", 100.0, 10.0, False)
    # batch 1: 2e9 FLOP = 0.02 s compute; 4e9 bytes = 0.4 s memory -> memory-bound
    small = estimate.decode("gen", 2e9, 4_000_000_000, rows=1, steps=10, batch_size=8, limits=lim)
    assert small.seconds == pytest.approx(10 * 0.4 / estimate.DECODE_EFFICIENCY)
    # batch 100: 2e11 FLOP = 2 s compute > 0.4 s memory -> compute-bound; 250 rows = 100 + 100 + 50
    big = estimate.decode("gen", 2e9, 4_000_000_000, rows=250, steps=10, batch_size=100, limits=lim)
    assert big.seconds == pytest.approx(10 * (2 + 2 + 1) / estimate.DECODE_EFFICIENCY)


@pytest.mark.parametrize("native", [True, False])
def test_report_says_why_fp32_or_bf16(native):
    dtype = "bfloat16" if native else "float32"
    text = estimate.report([estimate.Stage("discovery", 120.0, "x")], Limits(dtype, 50.0, 5.0, native))
    assert ("natively" in text) == native
    assert ("no native bf16" in text) == (not native)
    assert "2.0 min" in text and "total" in text


def test_measure_reports_positive_limits():
    lim = estimate.measure(torch.float32, seconds=0.02)
    assert lim.matmul_gflops > 0 and lim.memory_gbps > 0 and lim.dtype == "float32"
