"""Tolerances for comparing two fp32 evaluations of the same network that differ only in the order of
their floating-point sums (batch shape, padding, kernel blocking, a weight edit instead of a hook).

One fp32 dot product of length ``k`` carries a rounding error of at most ``γ_k · Σ|x_i y_i|`` with
``γ_k ≈ k·u`` in the worst case, and about ``√k · u · Σ|x_i y_i|`` for independent rounding errors
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1 and §4.2); ``u = 2⁻²⁴``.
Two different orders differ by at most the sum of both errors. A residual network of ``depth``
blocks adds one such error per block (the residual stream carries earlier errors forward with gain
≈ 1; norms rescale both sides alike), and independent per-block errors add in quadrature. With
``scale`` the largest magnitude compared, the bound used is::

    atol = safety · 2 · √depth · √k · u · scale

``safety`` (default 8) covers non-linear gains (SiLU, softmax) and the gap between ``Σ|x_i y_i|``
and ``scale``. The bound is orders of magnitude below any real bug (a padding leak, a wrong
position or a missed hook moves values by O(scale)), and it does not depend on the CPU's kernels.
"""

from __future__ import annotations

import math

import torch

U_FP32 = 2.0**-24


def fp32_atol(scale: float, k: int, depth: int = 1, safety: float = 8.0) -> float:
    """Absolute tolerance for two fp32 results of a ``depth``-block network with ``k``-term sums."""
    return safety * 2 * math.sqrt(depth) * math.sqrt(k) * U_FP32 * float(scale)


def assert_close_fp32(
    got: torch.Tensor,
    expected: torch.Tensor,
    k: int,
    depth: int = 1,
    safety: float = 8.0,
    scale: float | None = None,
) -> None:
    """``assert_close`` at :func:`fp32_atol` (``rtol = 0``). ``scale``: the magnitude the rounding errors
    are relative to, by default the largest of ``expected``; pass it where ``expected`` is a difference
    or a spread of larger values (a diff of two means is off by the error of the means)."""
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        got.to(expected.dtype), expected, atol=fp32_atol(scale, k, depth, safety), rtol=0.0, equal_nan=True
    )
