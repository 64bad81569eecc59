"""The benchmark runs end to end on a tiny model (schema only, never timings) and counts FLOP right."""

import json

import pytest

from cna_lens import bench, models
from cna_lens.cli import main

from ..conftest import hf_reference

pytestmark = pytest.mark.integration

KEYS = {
    "kind",
    "model",
    "dtype",
    "machine",
    "limit_gflops",
    "settings",
    "gflop_per_token",
    "attribution",
    "hf_forward",
    "generation",
    "batch1_attribution",
    "rss_growth_mib",
    "rss_peak_mib",
}


def test_flops_per_token_counts_the_matmul_parameters(llama_model, llama_dir):
    hf = hf_reference(llama_dir)
    mats = sum(p.numel() for n, p in hf.model.layers.named_parameters() if n.endswith("proj.weight"))
    assert bench.flops_per_token(llama_model, unembed=False) == 2 * mats
    assert bench.flops_per_token(llama_model, unembed=True) == 2 * (mats + hf.lm_head.weight.numel())


def test_bench_smoke(llama_model, llama_dir):
    res = bench.bench(
        llama_model,
        hf_reference(llama_dir),
        n_prompts=4,
        batch_size=4,
        max_new_tokens=3,
        repeats=1,
        rss_prompts=(8, 16),
        quick_limits=True,
        progress=False,
    )
    assert set(res) == KEYS
    json.dumps(res)  # JSON-ready
    assert res["machine"]["matmul_gflops_float32"] > 0 and res["machine"]["memory_read_gbps"] > 0
    for part in (res["attribution"], res["generation"], res["generation"]["ablated"]):
        assert part["min_s"] <= part["median_s"] <= part["max_s"] and part["repeats"] == 1
    assert res["attribution"]["fraction_of_limit"] > 0 and res["hf_forward"]["attribution_over_hf"] > 0
    assert res["generation"]["ablated"]["new_tokens"] > 0 and res["generation"]["ablated_over_plain_per_new_token"] > 0
    assert 0 < res["generation"]["new_tokens"] <= 4 * 3
    assert set(res["rss_growth_mib"]) == set(res["rss_peak_mib"]) == {"8", "16"}
    assert res["rss_peak_mib"]["8"] > 10  # a real process reading, not a placeholder
    table = bench.markdown([res])
    assert table.count("\n") == 3 and res["model"] in table


def test_bench_cli_writes_json_and_table(llama_dir, tmp_path, capsys):
    rc = main(
        [
            "bench",
            "--model",
            str(llama_dir),
            "--out",
            str(tmp_path),
            "--prompts",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "2",
            "--repeats",
            "1",
            "--rss",
            "4",
            "--no-batch1",
        ]
    )
    assert rc == 0
    (js,) = tmp_path.glob("*.json")
    assert json.loads(js.read_text())["kind"] == "cna_lens.Bench"
    assert "| model |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("native", [True, False])
def test_machine_times_bf16_only_where_native(monkeypatch, native):
    if native and not models.native_bf16():
        pytest.skip("this CPU has no native bfloat16")
    monkeypatch.setattr(bench, "native_bf16", lambda device="cpu": native)
    m = bench.machine(quick=True)
    assert m["native_bf16"] is native and m["matmul_gflops_float32"] > 0
    if native:
        assert m["matmul_gflops_bfloat16"] > 0
    else:  # emulated bf16 is not timed
        assert m["matmul_gflops_bfloat16"] is None


def test_bench_refuses_dtype_the_cpu_cannot_run(llama_dir, tmp_path, monkeypatch, capsys):
    from cna_lens import models

    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": False)
    assert main(["bench", "--model", str(llama_dir), "--dtype", "bfloat16", "--out", str(tmp_path)]) == 2
    assert "no native bfloat16" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
