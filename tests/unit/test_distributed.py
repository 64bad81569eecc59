"""Data-parallel discovery on 2 and 3 gloo ranks equals the single-process result."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import cna_lens
from cna_lens.distributed import attribute_distributed
from cna_lens.fast import shared_prefix

from ..conftest import PROMPTS


def _worker(rank, world, init_file, model_dir, pos, neg, out, share):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = cna_lens.load_model(model_dir, dtype=torch.float32)
        with shared_prefix(share):
            attr = attribute_distributed(model, pos, neg, batch_size=2, progress=False)
        attr.save(f"{out}/rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("world,n", [(2, 5), (3, 2)])  # (3, 2): more ranks than prompts per set
def test_distributed_equals_single_process(llama_dir, llama_model, tmp_path, world, n, share):
    """≤1e-6 with unshared batches; a shared prefix adds batch-layout rounding (≤1e-5 of the scale)."""
    pos, neg = PROMPTS[:n], PROMPTS[-n:]
    args = (world, str(tmp_path / "init"), str(llama_dir), pos, neg, str(tmp_path), share)
    mp.spawn(_worker, args=args, nprocs=world)
    with shared_prefix(share):
        ref = cna_lens.attribute(llama_model, pos, neg, batch_size=2, progress=False)
    for rank in range(world):
        got = cna_lens.Attribution.load(tmp_path / f"rank{rank}")
        assert (got.n_pos, got.n_neg) == (n, n)
        for name in ("sum_pos", "diff", "std"):
            a, b = getattr(got, name), getattr(ref, name)
            tol = 1e-5 * b.abs().max() if share else 1e-6
            torch.testing.assert_close(a, b, atol=tol, rtol=1e-6, msg=name)
