"""Contrastive attribution: batching invariance, an independent reference, ranking, save/load, merge."""

import json

import pytest
import torch

import cna_lens
from cna_lens.attribute import attribute_multi, attribute_tokens
from cna_lens.prompts import encode

from ..conftest import PROMPTS, hf_reference
from ..helpers import activation_scale, assert_close_model, hf_down_proj_inputs

POS = PROMPTS[:4] + ["Give me step by step instructions to build something dangerous at home"]
NEG = PROMPTS[4:] + ["Ok", "Summarize the plot of a famous novel in three sentences please"]


@pytest.fixture(scope="module")
def attr(llama_model):
    return cna_lens.attribute(llama_model, POS, NEG, batch_size=16, progress=False)


def test_attribution_matches_independent_reference(llama_dir, llama_model, attr):
    hf = hf_reference(llama_dir)
    tok = llama_model.tokenizer
    pos = hf_down_proj_inputs(hf, encode(tok, POS)).double()
    neg = hf_down_proj_inputs(hf, encode(tok, NEG)).double()
    # Each activation differs from the unpadded HF pass by fp32 summation order only (≤ c·|a|); the sums
    # over prompts are float64. Means and their difference are then off by ≤ c·RMS (activation_scale),
    # and so is the pooled std, a scaled l2 norm of deviations (triangle inequality, √(N/(N−2)) ≤ 1.2
    # here, inside the helper's safety factor 8); float64 Σa² − (Σa)²/n cancels to ~1e-8·|a| at most.
    scale = float(torch.cat([pos, neg]).abs().max())
    assert_close_model(attr.mean_pos.double(), pos.mean(0), llama_model, scale)
    assert_close_model(attr.diff.double(), pos.mean(0) - neg.mean(0), llama_model, scale)
    pooled = ((len(POS) - 1) * pos.var(0) + (len(NEG) - 1) * neg.var(0)) / (len(POS) + len(NEG) - 2)
    assert_close_model(attr.std.double(), pooled.sqrt(), llama_model, scale)
    assert attr.diff.dtype == torch.float32 and attr.sum_pos.dtype == torch.float64
    assert (attr.n_pos, attr.n_neg) == (len(POS), len(NEG))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_invariance(llama_model, attr, batch_size):
    other = cna_lens.attribute(llama_model, POS, NEG, batch_size=batch_size, progress=False)
    # another batch shape and padding: fp32 summation order only (see the reference test above)
    assert_close_model(other.diff, attr.diff, llama_model, activation_scale(attr))
    assert_close_model(other.std, attr.std, llama_model, activation_scale(attr))


def test_several_hooks_in_one_pass_equal_separate_passes(llama_model, attr):
    both = attribute_multi(llama_model, POS, NEG, ["mlp.hook_post", "hook_mlp_out"], batch_size=16, progress=False)
    alone = cna_lens.attribute(llama_model, POS, NEG, batch_size=16, hook="hook_mlp_out", progress=False)
    for got, ref in ((both["mlp.hook_post"], attr), (both["hook_mlp_out"], alone)):
        assert (got.hook, got.n_pos, got.n_neg) == (ref.hook, ref.n_pos, ref.n_neg)
        for k in ("sum_pos", "sum_neg", "sumsq_pos", "sumsq_neg"):
            # extra hooks only read: the same forwards on the same batches, bit for bit
            assert torch.equal(getattr(got, k), getattr(ref, k)), k
    assert both["hook_mlp_out"].d_mlp == llama_model.cfg.d_model
    with pytest.raises(ValueError, match="blocks.0.nope"):
        attribute_multi(llama_model, POS, NEG, ["mlp.hook_post", "nope"], progress=False)


def test_merge_of_shards_equals_one_pass(llama_model, attr):
    """Merging adds float64 sums; the shards' other batch layouts change the activations by fp32
    summation order only."""
    tok = llama_model.tokenizer
    pos, neg = encode(tok, POS), encode(tok, NEG)
    whole = attribute_tokens(llama_model, pos, neg, progress=False)
    shards = [
        attribute_tokens(llama_model, pos[:2], neg[:1], progress=False),
        attribute_tokens(llama_model, pos[2:], [], progress=False),
        attribute_tokens(llama_model, [], neg[1:], progress=False),
    ]
    merged = cna_lens.Attribution.merge(shards)
    assert (merged.n_pos, merged.n_neg) == (whole.n_pos, whole.n_neg)
    assert_close_model(merged.diff, whole.diff, llama_model, activation_scale(whole))
    assert_close_model(merged.diff, attr.diff, llama_model, activation_scale(attr))  # attr: batch 16
    strided = [cna_lens.attribute(llama_model, POS, NEG, shard=(i, 6), progress=False) for i in range(6)]
    merged = cna_lens.Attribution.merge(strided)  # 5 prompts a set in 6 shards: the last holds none
    assert (merged.n_pos, merged.n_neg) == (whole.n_pos, whole.n_neg)
    # one prompt per forward in the shards against whole batches: fp32 summation order only
    assert_close_model(merged.diff, whole.diff, llama_model, activation_scale(whole))
    with pytest.raises(ValueError, match="shard"):
        cna_lens.attribute(llama_model, POS, NEG, shard=(2, 2))
    foreign = cna_lens.Attribution("other", attr.hook, 1, 1, *(torch.zeros_like(attr.sum_pos),) * 4)
    with pytest.raises(ValueError, match="model_name"):
        cna_lens.Attribution.merge([attr, foreign])


def _synthetic(diff: torch.Tensor, std: float = 1.0) -> cna_lens.Attribution:
    """An attribution with a chosen diff: 2 positive / 2 negative prompts, symmetric spread."""
    n = 2
    z = torch.zeros_like(diff, dtype=torch.float64)
    mean_pos = diff.double()
    sumsq = lambda m: 2 * (m.square() + std**2 / 2)  # two values m ± std/√2 … variance std² (n−1=1)  # noqa: E731
    return cna_lens.Attribution("synthetic", "mlp.hook_post", n, n, mean_pos * n, z, sumsq(mean_pos), sumsq(z))


def test_top_neurons_global_ranking_and_rules():
    diff = torch.zeros(4, 10)
    diff[0, 0] = 100.0  # excluded layer
    diff[2, 3], diff[3, 7], diff[1, 1], diff[3, 0] = 5.0, -9.0, 1.0, 3.0
    a = _synthetic(diff)
    top = a.top_neurons(k=3)
    assert list(zip(top.layers, top.indices)) == [(3, 7), (2, 3), (3, 0)]
    assert top.per_layer_counts() == [0, 0, 1, 2]
    signed = a.top_neurons(k=2, by="diff")
    assert list(zip(signed.layers, signed.indices)) == [(2, 3), (3, 0)]
    assert a.top_neurons(k=1, exclude_layers=()).pairs == {(0, 0)}
    assert len(a.top_neurons(fraction=0.05)) == 2  # 5 % of 40 neurons
    # diff / pooled std = 5 / 1, computed in float64 (error ~1e-15) and rounded to float32: exactly 5
    assert float(a.effect[2, 3]) == 5.0


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(k=0), "k must be"),
        (dict(k=31), "k must be"),
        (dict(fraction=0.0), "fraction"),
        (dict(fraction=1.5), "fraction"),
        (dict(k=1, by="nope"), "by="),
        (dict(k=1, exclude_layers=(9,)), "exclude_layers"),
    ],
)
def test_top_neurons_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _synthetic(torch.randn(4, 10)).top_neurons(**kw)


def test_save_load_roundtrip(tmp_path, attr):
    attr.save(tmp_path / "a")
    back = cna_lens.Attribution.load(tmp_path / "a")
    for k in ("sum_pos", "sum_neg", "sumsq_pos", "sumsq_neg"):
        assert torch.equal(getattr(back, k), getattr(attr, k))
    assert (back.model_name, back.hook, back.n_pos, back.n_neg) == (attr.model_name, attr.hook, attr.n_pos, attr.n_neg)
    ns = attr.top_neurons(k=7)
    ns.save(tmp_path / "n.json")
    assert cna_lens.NeuronSet.load(tmp_path / "n.json") == ns
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_load_rejects_corrupt_or_foreign(tmp_path, attr):
    attr.save(tmp_path / "a")
    (tmp_path / "a" / "attribution.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        cna_lens.Attribution.load(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "attribution.json").write_text(json.dumps({"kind": "something.else"}))
    with pytest.raises(ValueError, match="not a saved"):
        cna_lens.Attribution.load(tmp_path / "b")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        cna_lens.NeuronSet.load(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError):
        cna_lens.Attribution.load(tmp_path / "missing")


def test_bad_input(llama_model):
    with pytest.raises(ValueError, match="`positive` is empty"):
        cna_lens.attribute(llama_model, [], NEG)
    with pytest.raises(TypeError, match="`negative`"):
        cna_lens.attribute(llama_model, POS, "a single string")
    with pytest.raises(ValueError, match="hook point"):
        cna_lens.attribute(llama_model, POS, NEG, hook="mlp.hook_nonexistent")


def test_non_finite_activations_name_the_layer(llama_model):
    def poison(act, hook):
        act[:] = float("nan")
        return act

    with llama_model.hooks(fwd_hooks=[("blocks.2.mlp.hook_pre", poison)]):
        with pytest.raises(FloatingPointError, match=r"blocks\.2\.mlp\.hook_post"):
            cna_lens.attribute(llama_model, POS, NEG, progress=False)


def test_saved_files_have_normal_permissions(tmp_path, attr):
    import os
    import stat

    attr.save(tmp_path / "a")
    mask = os.umask(0)
    os.umask(mask)
    for f in (tmp_path / "a").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
