"""Where does batched greedy generation spend its time? torch.profiler over one ``generate`` call.

python scripts/profile_generate.py --model smollm2-135m-instruct --out results/profile-smollm2-135m-instruct
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.runs import atomic_write_json, atomic_write_text

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--max-new-tokens", type=int, default=32)
p.add_argument("--ablate", type=float, default=None, help="also ablate this top fraction (e.g. 0.001)")
p.add_argument("--threads", type=int, default=None)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
model = cna_lens.load_model(args.model)
prompts = load_prompts("jbb_harmful", args.batch_size)
ctx = torch.autograd.grad_mode.no_grad
if args.ablate:
    attr = cna_lens.attribute(
        model, load_prompts("discovery_harmful"), load_prompts("discovery_harmless"), batch_size=32
    )
    ns = attr.top_neurons(fraction=args.ablate)
    ctx = lambda: cna_lens.edit_weights(model, ns)  # noqa: E731
with ctx():
    cna_lens.generate(model, prompts[:4], max_new_tokens=4, batch_size=4, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        cna_lens.generate(
            model, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False
        )
        wall = time.perf_counter() - t0
avg = prof.key_averages()
total = sum(e.self_cpu_time_total for e in avg)
groups = {
    "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "copy_/cat (KV cache appends, dtype casts)": ("aten::copy_", "aten::cat"),
    "other aten ops": ("aten::",),
}
# shares of wall time: the profiler's CPU time is the calling thread's time inside each op (intra-op
# threads work within it), so what no op accounts for is Python / bridge glue between the ops
budget = wall * 1e6
share: dict[str, float] = {"outside ops (python, generate glue)": max(0.0, 1 - total / budget)}
for e in avg:
    name = next((g for g, pre in groups.items() if e.key.startswith(pre)), "other")
    share[name] = share.get(name, 0.0) + e.self_cpu_time_total / budget
table = avg.table(sort_by="self_cpu_time_total", row_limit=25)
out = Path(args.out)
atomic_write_text(out / "profile.txt", table)
atomic_write_json(
    out / "profile.json",
    {
        "model": args.model,
        "wall_s": wall,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "ablate": args.ablate,
        "threads": torch.get_num_threads(),
        "self_cpu_share": share,
    },
)
print(table)
print(f"wall {wall:.2f} s; self-CPU share: " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
