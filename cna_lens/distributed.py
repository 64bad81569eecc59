"""Data-parallel discovery and evaluation with ``torch.distributed`` (gloo on CPU, nccl on GPU; torchrun).

Discovery: each rank takes the prompts ``rank::world_size`` of both sets and computes its running
sums; the sums and counts are all-reduced, so every rank ends with the same ``Attribution`` as one
process over all prompts (``Attribution.merge`` in a collective). Ranks with no prompts contribute zeros.
Evaluation: each rank generates the prompts ``rank::world_size`` of every job under that job's
intervention (:func:`cna_lens.generation.generate_many`) and the texts are all-gathered, in the input order.

    torchrun --nproc-per-node 2 -m cna_lens.distributed --model smollm2-135m-instruct --out runs/ddp
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .attribute import Attribution, attribute
from .generation import Job, generate_many
from .models import HookedModel


def attribute_distributed(
    model: HookedModel, positive: Sequence[str], negative: Sequence[str], **kwargs: Any
) -> Attribution:
    """:func:`cna_lens.attribute` sharded over the ranks of the default process group: each rank sums its
    ``shard`` of the prompts, and the sums and counts are all-reduced. ``kwargs`` go to ``attribute``."""
    if not (dist.is_available() and dist.is_initialized()):
        return attribute(model, positive, negative, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs["progress"] = kwargs.get("progress", True) and rank == 0
    part = attribute(model, positive, negative, shard=(rank, world), **kwargs)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    stats = torch.stack([part.sum_pos, part.sum_neg, part.sumsq_pos, part.sumsq_neg]).to(device)
    counts = torch.tensor([part.n_pos, part.n_neg], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    dist.all_reduce(counts)
    stats = stats.cpu()
    return Attribution(part.model_name, part.hook, int(counts[0]), int(counts[1]), *stats)


def generate_distributed(model: HookedModel, jobs: Sequence[Job], **kwargs: Any) -> list[list[str]]:
    """:func:`cna_lens.generation.generate_many` sharded over the ranks of the default process group:
    every rank returns all completions, ``out[job][i]`` for ``jobs[job][1][i]``. ``kwargs`` go to
    ``generate_many`` (``on_done`` reports a rank's own rows, with their indices in the full lists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return generate_many(model, jobs, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    on_done = kwargs.pop("on_done", None)
    mine = [(make, list(prompts)[rank::world]) for make, prompts in jobs]
    keep = [j for j, (_, prompts) in enumerate(mine) if prompts]  # a rank may hold none of a job's prompts
    done = None if on_done is None else (lambda k, i, text: on_done(keep[k], rank + i * world, text))
    kwargs["progress"] = kwargs.get("progress", True) and rank == 0
    texts = generate_many(model, [mine[j] for j in keep], on_done=done, **kwargs) if keep else []
    part: list[list[str]] = [[] for _ in jobs]
    for k, j in enumerate(keep):
        part[j] = texts[k]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, part)
    out = [[""] * len(prompts) for _, prompts in jobs]
    for r, by_job in enumerate(parts):
        for j, row in enumerate(by_job):
            out[j][r::world] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from .datasets import load_prompts
    from .models import load_model

    p = argparse.ArgumentParser(description="data-parallel CNA discovery (run under torchrun)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--positive", default="discovery_harmful")
    p.add_argument("--negative", default="discovery_harmless")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        device = f"cuda:{dist.get_rank() % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        model = load_model(args.model, device=device)
        attr = attribute_distributed(
            model, load_prompts(args.positive), load_prompts(args.negative), batch_size=args.batch_size
        )
        dist.barrier()  # every rank's collectives are done before any rank tears its connections down
        if dist.get_rank() == 0:
            attr.save(args.out)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
