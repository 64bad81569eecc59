"""Data-parallel discovery on 2 and 3 gloo ranks equals the single-process result."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import cna_lens
from cna_lens.distributed import attribute_distributed

from ..conftest import PROMPTS


def _worker(rank, world, init_file, model_dir, pos, neg, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = cna_lens.load_model(model_dir, dtype=torch.float32)
        attr = attribute_distributed(model, pos, neg, batch_size=2, progress=False)
        attr.save(f"{out}/rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,n", [(2, 5), (3, 2)])  # (3, 2): more ranks than prompts per set
def test_distributed_equals_single_process(llama_dir, llama_model, tmp_path, world, n):
    """≤1e-6: the ranks batch the prompts differently, which changes the rounding only."""
    pos, neg = PROMPTS[:n], PROMPTS[-n:]
    args = (world, str(tmp_path / "init"), str(llama_dir), pos, neg, str(tmp_path))
    mp.spawn(_worker, args=args, nprocs=world)
    ref = cna_lens.attribute(llama_model, pos, neg, batch_size=2, progress=False)
    for rank in range(world):
        got = cna_lens.Attribution.load(tmp_path / f"rank{rank}")
        assert (got.n_pos, got.n_neg) == (n, n)
        for name in ("sum_pos", "diff", "std"):
            a, b = getattr(got, name), getattr(ref, name)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def _jobs(model, n):
    from cna_lens.engine import steer_mlp_out

    g = torch.Generator().manual_seed(0)
    vectors = 0.3 * torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    return [(None, PROMPTS[:n]), (lambda: steer_mlp_out(model, vectors, 1.0), PROMPTS[-n:]), (None, PROMPTS[:1])]


def _generate_worker(rank, world, init_file, model_dir, n, out):
    import json

    import torch.distributed as dist

    from cna_lens.distributed import generate_distributed

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = cna_lens.load_model(model_dir, dtype=torch.float32)
        seen = []
        texts = generate_distributed(
            model, _jobs(model, n), max_new_tokens=8, batch_size=3, progress=False, on_done=lambda *a: seen.append(a)
        )
        with open(f"{out}/gen{rank}.json", "w") as f:
            json.dump({"texts": texts, "seen": seen}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,n", [(2, 5), (3, 2)])  # (3, 2): a rank with no prompts at all
def test_distributed_generation_equals_single_process(llama_dir, llama_model, tmp_path, world, n):
    import json

    from cna_lens.generation import generate_many

    mp.spawn(_generate_worker, args=(world, str(tmp_path / "init"), str(llama_dir), n, str(tmp_path)), nprocs=world)
    jobs = _jobs(llama_model, n)
    ref = generate_many(llama_model, jobs, max_new_tokens=8, batch_size=3, progress=False)
    assert ref[0] != ref[1]  # the steered condition differs, so a mix-up of jobs would show
    seen = []
    for rank in range(world):
        got = json.load(open(tmp_path / f"gen{rank}.json"))
        assert got["texts"] == ref
        assert all(text == ref[j][i] for j, i, text in got["seen"])
        seen += [(j, i) for j, i, _ in got["seen"]]
    assert sorted(seen) == [(j, i) for j, (_, prompts) in enumerate(jobs) for i in range(len(prompts))]  # once each
