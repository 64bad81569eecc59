"""Data-parallel discovery and generation on 3 gloo ranks equal the single-process results (one spawn:
each rank runs both). The shapes cover the edge cases: 2 positive prompts (a rank with none) beside 5
negative ones (ranks with several), and generation jobs of 2, 2 and 1 prompts (a rank with no prompt at
all)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import cna_lens
from cna_lens.distributed import attribute_distributed, generate_distributed
from cna_lens.generation import generate_many

from ..conftest import PROMPTS
from ..helpers import activation_scale, assert_close_model

pytestmark = pytest.mark.integration


WORLD = 3
POS, NEG = PROMPTS[:2], PROMPTS[-5:]


def _jobs(model, n=2):
    from cna_lens.engine import steer_mlp_out

    g = torch.Generator().manual_seed(0)
    vectors = 0.3 * torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    return [(None, PROMPTS[:n]), (lambda: steer_mlp_out(model, vectors, 1.0), PROMPTS[-n:]), (None, PROMPTS[:1])]


def _worker(rank, world, init_file, model_dir, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = cna_lens.load_model(model_dir, dtype=torch.float32)
        attr = attribute_distributed(model, POS, NEG, batch_size=2, progress=False)
        attr.save(f"{out}/rank{rank}")
        seen = []
        texts = generate_distributed(
            model, _jobs(model), max_new_tokens=8, batch_size=3, progress=False, on_done=lambda *a: seen.append(a)
        )
        dist.barrier()  # every rank's gloo work is done before any rank tears its connections down
        with open(f"{out}/gen{rank}.json", "w") as f:
            json.dump({"texts": texts, "seen": seen}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process(llama_dir, llama_model, tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(llama_dir), str(tmp_path)), nprocs=WORLD)

    ref = cna_lens.attribute(llama_model, POS, NEG, batch_size=2, progress=False)
    # The ranks batch (and pad) the prompts differently: activations differ by fp32 summation order,
    # bounded at the largest RMS activation (tests/helpers.py: activation_scale); the sums over
    # prompts are float64 and add nothing. Means, diffs and stds inherit the per-activation bound.
    scale = activation_scale(ref)
    for rank in range(WORLD):
        got = cna_lens.Attribution.load(tmp_path / f"rank{rank}")
        assert (got.n_pos, got.n_neg) == (len(POS), len(NEG))
        for name in ("mean_pos", "mean_neg", "diff", "std"):
            assert_close_model(getattr(got, name), getattr(ref, name), llama_model, scale)

    jobs = _jobs(llama_model)
    texts = generate_many(llama_model, jobs, max_new_tokens=8, batch_size=3, progress=False)
    assert texts[0] != texts[1]  # the steered condition differs, so a mix-up of jobs would show
    seen = []
    for rank in range(WORLD):
        got = json.load(open(tmp_path / f"gen{rank}.json"))
        assert got["texts"] == texts
        assert all(text == texts[j][i] for j, i, text in got["seen"])
        seen += [(j, i) for j, i, _ in got["seen"]]
    assert sorted(seen) == [(j, i) for j, (_, prompts) in enumerate(jobs) for i in range(len(prompts))]  # once each
