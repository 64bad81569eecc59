"""Figures for README/figures from committed result files (no model needed):

python scripts/make_figures.py
"""

from pathlib import Path

import cna_lens
import cna_lens.circuits
from cna_lens import plot
from cna_lens.compare import layer_profile

RESULTS = Path("results")
FIG = Path("figures")
figures = {}  # stem: figure, written together at the end (one Chrome draws every PNG)

a15 = cna_lens.Attribution.load(RESULTS / "foundation-qwen2.5-coder-1.5b-instruct" / "attribution")
for f in (0.001, 0.003):
    ns = a15.top_neurons(fraction=f)
    figures[FIG / f"qwen1.5b_layer_histogram_{f}"] = plot.layer_histogram(
        ns, f"Qwen2.5-Coder-1.5B-Instruct: top {100 * f:g} % of MLP neurons by |diff| ({len(ns)} neurons)"
    )
figures[FIG / "qwen1.5b_attribution_heatmap"] = plot.attribution_heatmap(a15, top_n=64, exclude_layers=(0, 1))

profiles = {}
for name in (
    "foundation-qwen2.5-coder-1.5b-instruct",
    "reproduce-qwen2.5-coder-0.5b-instruct",
    "reproduce-qwen2.5-coder-1.5b-instruct",
):
    path = RESULTS / name / "attribution"
    if (path / "attribution.json").exists():
        a = cna_lens.Attribution.load(path)
        profiles[f"{a.model_name} ({a.n_layers}×{a.d_mlp})"] = layer_profile(a.top_neurons(fraction=0.001))
if len(profiles) > 1:
    figures[FIG / "qwen_cross_size_profiles"] = plot.layer_profiles(profiles)

# each reproduce run draws its own dose-response and method figures into RUN/figures/
for lm_dir in sorted(RESULTS.glob("*/layer_map")):
    figures[FIG / f"{lm_dir.parent.name}_circuit_map"] = plot.circuit_map(cna_lens.circuits.LayerMap.load(lm_dir))
plot.save_figures(figures)
