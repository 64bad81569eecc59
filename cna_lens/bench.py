"""``cna-lens bench``: CNA's cost as a fraction of this machine's limits, measured in the same run.

Every figure is the median (with min and max) of ``repeats`` timed runs after one warm-up, on the
same prompts, batch size and threads:

* machine limits: matmul GFLOP/s (float32, and bfloat16 where it is native) and memory read GB/s;
* attribution tokens/s and its fraction of the matmul limit, ``tokens · F_blocks / t / limit``, where
  ``F_blocks = 2 · (parameters of the blocks)`` FLOP per token (it stops after the last hook: no
  unembedding); and its time relative to a plain HF ``model(ids, attention_mask)`` forward over
  all prompt tokens;
* greedy generation tokens/s at the given batch (HF ``generate``, static batches: finished rows stay
  until the batch ends), its fraction of the limit with ``tokens · F_blocks + new_tokens · F_full``
  FLOP (counting emitted tokens only; the prefill computes logits at the last position only;
  ``F_full = F_blocks + 2 · d_model · d_vocab``), and the time under ``edit_weights(top 0.1 %)``
  relative to no intervention (also per new token: ablated models refuse less and write more);
* the batched pipeline vs a batch-size-1 loop of the same attribution;
* peak RSS, and its growth, during attribution of ``rss_prompts`` prompts (flat: only running sums
  are kept; the runs go from fewest to most prompts, so memory that grows with the prompts shows).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from itertools import cycle, islice
from typing import Any

import torch

from .attribute import attribute
from .datasets import load_prompts
from .edit import edit_weights
from .generation import eos_token_ids, greedy_tokens
from .models import HookedModel, model_name, native_bf16
from .prompts import encode, left_pad, length_batches, pad_id


def _timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def _best_of(fn: Callable[[], Any], seconds: float) -> float:
    """Fastest of repeated calls of ``fn`` (after one warm-up call) over about ``seconds``."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Best-of GFLOP/s of an ``n × n`` matmul (``2 n³`` FLOP) over ~``seconds``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best_of(lambda: a @ b, seconds) / 1e9


def memory_gbps(mbytes: int = 512, seconds: float = 1.0) -> float:
    """Best-of read bandwidth: ``sum`` over a float32 buffer larger than the caches."""
    x = torch.ones(mbytes * 2**20 // 4)
    return x.numel() * 4 / _best_of(x.sum, seconds) / 1e9


def cpu_flags() -> list[str]:
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
    return [f for f in line.split(":", 1)[1].split() if f in wanted]


def machine(quick: bool = False) -> dict[str, Any]:
    """The limits CNA is measured against, plus what the numbers ran on."""
    n, s = (512, 0.2) if quick else (2048, 1.0)
    bf16 = native_bf16("cpu")
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_gflops_float32": matmul_gflops(torch.float32, n, s),
        # emulated bf16 runs ~100x below fp32 on CPUs without it: not worth the seconds
        "matmul_gflops_bfloat16": matmul_gflops(torch.bfloat16, n, s) if bf16 else None,
        "native_bf16": bf16,
        "memory_read_gbps": memory_gbps(64 if quick else 512, s),
    }


def flops_per_token(model: HookedModel, unembed: bool) -> float:
    """``2 ·`` the matmul parameters a token meets: attention (GQA-aware) + MLP (gated or not) per
    layer, plus the unembedding if ``unembed``. Attention-score FLOP are left out (short prompts)."""
    c = model.cfg
    kv = getattr(c, "n_key_value_heads", None) or c.n_heads
    attn = c.d_model * c.d_head * (2 * c.n_heads + 2 * kv)
    mlp = (3 if getattr(c, "gated_mlp", False) else 2) * c.d_model * c.d_mlp
    return 2.0 * (c.n_layers * (attn + mlp) + (c.d_model * c.d_vocab if unembed else 0))


def _rss_peak_during(fn: Callable[[], Any]) -> tuple[int, int]:
    """Peak resident memory (bytes) while ``fn`` runs, and its growth over the RSS before; 5 ms samples."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base, peak, done = rss(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    top = max(peak[0], rss())
    return top, max(0, top - base)


def _hf_forward(hf: Any, seqs: Sequence[Sequence[int]], pad: int, batch_size: int) -> Callable[[], None]:
    """A plain HF ``model(input_ids, attention_mask)`` forward over the same batches. ``hf`` must be plain
    HF modules (e.g. :func:`cna_lens.engine.stock_model`): the bridge's ``original_model`` runs through the
    bridge's components."""

    def run() -> None:
        with torch.inference_mode():
            for batch in length_batches([len(s) for s in seqs], batch_size):
                ids, mask = left_pad([seqs[i] for i in batch], pad, hf.device)
                hf(input_ids=ids, attention_mask=mask)

    return run


def bench(
    model: HookedModel,
    hf_model: Any = None,
    *,
    n_prompts: int = 32,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    repeats: int = 3,
    rss_prompts: Sequence[int] = (100, 400),
    batch1: bool = True,
    quick_limits: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every measurement of the module docstring; returns the JSON-ready result. ``hf_model``: the
    same weights as a plain HF model, for the attribution-vs-forward ratio (skipped if None)."""
    say = print if progress else (lambda *a, **k: None)
    lim = machine(quick_limits)
    say(f"limits: {lim['matmul_gflops_float32']:.0f} GFLOP/s fp32, {lim['memory_read_gbps']:.0f} GB/s")
    harmful, harmless = load_prompts("discovery_harmful"), load_prompts("discovery_harmless")
    pos, neg = harmful[: n_prompts // 2], harmless[: n_prompts - n_prompts // 2]
    seqs = encode(model.tokenizer, pos + neg)
    n_tok = sum(len(s) for s in seqs)
    f_blocks, f_full = flops_per_token(model, unembed=False), flops_per_token(model, unembed=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    # the limit of the dtype the model computes in (bf16 is only benchmarked where it is native)
    limit_gflops = lim.get(f"matmul_gflops_{dtype}") or lim["matmul_gflops_float32"]
    limit = limit_gflops * 1e9
    out: dict[str, Any] = {
        "kind": "cna_lens.Bench",
        "model": model_name(model),
        "dtype": dtype,
        "machine": lim,
        "limit_gflops": limit_gflops,
        "settings": {
            "n_prompts": len(seqs),
            "prompt_tokens": n_tok,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "repeats": repeats,
        },
        "gflop_per_token": {"blocks": f_blocks / 1e9, "with_unembed": f_full / 1e9},
    }

    def attr(bs: int = batch_size) -> Any:
        return attribute(model, pos, neg, batch_size=bs, progress=False)

    say("attribution ...")
    a = _timed(attr, repeats)
    a["tokens_per_s"] = n_tok / a["median_s"]
    a["fraction_of_limit"] = n_tok * f_blocks / a["median_s"] / limit
    out["attribution"] = a
    if hf_model is not None:
        say("plain HF forward ...")
        hf = _timed(_hf_forward(hf_model, seqs, pad_id(model.tokenizer), batch_size), repeats)
        out["hf_forward"] = hf | {"attribution_over_hf": a["median_s"] / hf["median_s"]}

    eos = eos_token_ids(model)
    counts: dict[str, int] = {}

    def gen() -> None:
        toks = greedy_tokens(model, seqs, max_new_tokens, batch_size=batch_size, eos=eos)
        counts["new"] = sum(map(len, toks))

    say("generation ...")
    g = _timed(gen, repeats)
    g["new_tokens"] = counts["new"]
    g["new_tokens_per_s"] = counts["new"] / g["median_s"]
    g["fraction_of_limit"] = (n_tok * f_blocks + counts["new"] * f_full) / g["median_s"] / limit
    top = attr().top_neurons(fraction=0.001)

    def gen_ablated() -> None:
        with edit_weights(model, top):
            gen()

    say("generation under edit_weights ...")
    ga = _timed(gen_ablated, repeats)
    ga["new_tokens"] = counts["new"]  # ablated models refuse less, so they often write more tokens
    per_token = (ga["median_s"] / ga["new_tokens"]) / (g["median_s"] / g["new_tokens"])
    out["generation"] = g | {
        "ablated": ga,
        "ablated_over_plain": ga["median_s"] / g["median_s"],
        "ablated_over_plain_per_new_token": per_token,
    }

    if batch1:
        say("batch-size-1 loop ...")
        b1 = _timed(lambda: attr(1), 1, warmup=0)
        out["batch1_attribution"] = b1 | {"batched_speedup": b1["median_s"] / a["median_s"]}

    rss: dict[str, float] = {}
    peak: dict[str, float] = {}
    for n in rss_prompts:
        say(f"peak RSS, {n} prompts ...")
        p, q = list(islice(cycle(harmful), n // 2)), list(islice(cycle(harmless), n - n // 2))
        run = lambda p=p, q=q: attribute(model, p, q, batch_size=batch_size, progress=False)
        top, grow = _rss_peak_during(run)
        peak[str(n)], rss[str(n)] = top / 2**20, grow / 2**20
    out["rss_growth_mib"], out["rss_peak_mib"] = rss, peak
    return out


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """One row per model: fractions of the limit and ratios (median [min–max] where timed)."""

    def mm(d: dict[str, Any], key: str = "median_s") -> str:
        return f"{d[key]:.2f} [{d['min_s']:.2f}–{d['max_s']:.2f}]"

    lines = [
        "| model | dtype | matmul limit GFLOP/s (that dtype) | attribution s | tok/s | fraction of limit "
        "| attribution / HF forward | generation s | new tok/s | fraction of limit | ablated / plain "
        "| batched speed-up | peak RSS MiB (growth) |",
        "|---" * 13 + "|",
    ]
    for r in results:
        a, g, h = r["attribution"], r["generation"], r.get("hf_forward")
        limit = r.get("limit_gflops", r["machine"]["matmul_gflops_float32"])  # results before limit_gflops: fp32
        b1 = r.get("batch1_attribution", {}).get("batched_speedup")
        over_hf = f"{h['attribution_over_hf']:.2f}" if h else "—"
        speedup = f"{b1:.1f}x" if b1 else "—"
        pt = g.get("ablated_over_plain_per_new_token")  # results before it: time ratio only
        per_tok = f" ({pt:.2f} per token)" if pt else ""
        lines.append(
            f"| {r['model']} | {r['dtype']} | {limit:.0f} | {mm(a)} | "
            f"{a['tokens_per_s']:.0f} | {a['fraction_of_limit']:.2f} | {over_hf} | {mm(g)} | "
            f"{g['new_tokens_per_s']:.1f} | {g['fraction_of_limit']:.2f} | {g['ablated_over_plain']:.2f}{per_tok} | "
            f"{speedup} | "
            + " / ".join(
                f"{k}: {r.get('rss_peak_mib', {}).get(k, float('nan')):.0f} (+{v:.0f})"
                for k, v in r["rss_growth_mib"].items()
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
