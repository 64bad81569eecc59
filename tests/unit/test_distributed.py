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
    pos, neg = PROMPTS[:n], PROMPTS[-n:]
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(llama_dir), pos, neg, str(tmp_path)), nprocs=world)
    ref = cna_lens.attribute(llama_model, pos, neg, batch_size=2, progress=False)
    for rank in range(world):
        got = cna_lens.Attribution.load(tmp_path / f"rank{rank}")
        assert (got.n_pos, got.n_neg) == (n, n)
        torch.testing.assert_close(got.sum_pos, ref.sum_pos, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.diff, ref.diff, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.std, ref.std, atol=1e-6, rtol=1e-6)
