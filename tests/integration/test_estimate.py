"""The run-time estimate: extrapolation from a timed slice, and what it tells the user on either CPU class."""

import pytest
import torch

from cna_lens import estimate, models
from cna_lens.estimate import Limits

pytestmark = pytest.mark.integration
needs_native_bf16 = pytest.mark.skipif(not models.native_bf16(), reason="this CPU has no native bfloat16")


def test_extrapolate_and_timed():
    assert estimate.extrapolate("x", 2.5, 4, "d").seconds == 10.0
    t = estimate.timed(lambda: sum(range(10_000)))
    assert 0 < t < 5


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
    assert lim.native_bf16 == models.native_bf16()


@needs_native_bf16
def test_measure_bf16_where_native():
    lim = estimate.measure(torch.bfloat16, seconds=0.02)
    assert lim.matmul_gflops > 0 and lim.dtype == "bfloat16" and lim.native_bf16
    assert "bf16: this CPU runs it natively" in estimate.report([], lim)


def test_measure_on_a_cpu_without_native_bf16_says_why_fp32(monkeypatch):
    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": False)
    lim = estimate.measure(torch.float32, seconds=0.02)
    assert not lim.native_bf16
    assert "fp32: this CPU has no native bf16" in estimate.report([], lim)


def test_demo_prints_its_plan(llama_dir, capsys):
    from cna_lens.cli import main

    assert main(["demo", "--model", str(llama_dir), "--n", "2", "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "discovery (202 prompts)" in err and "generation (2 × 2 prompts)" in err and "extrapolated" in err
