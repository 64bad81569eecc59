"""Generation on the stock engine: batching and padding change no token; weight edits + HF generate
give the same greedy tokens as TransformerLens hooks + TransformerLens' generate."""

import contextlib
import hashlib

import pytest
import torch

import cna_lens
from cna_lens.engine import steer_mlp_out, stock_model, tl_hooks_active
from cna_lens.generation import batches_by_length, engine_for, generate_many, greedy_tokens
from cna_lens.prompts import encode, left_pad

from ..conftest import PROMPTS
from .test_activations import _some_neurons


def _hf_generate_alone(hf, tok, seqs, n):
    """An independent plain HF model's greedy tokens, one prompt at a time (no padding)."""
    out = []
    for s in seqs:
        with torch.no_grad():
            ids = hf.generate(
                torch.tensor([s]),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )[0, len(s) :].tolist()
        out.append(ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids)
    return out


@pytest.mark.parametrize("engine", ["cb", "shrink", "hf"])
def test_batched_equals_one_at_a_time(tiny_model, prompts, engine):
    kw = dict(max_new_tokens=12, progress=False, engine=engine)
    batched = cna_lens.generate(tiny_model, prompts, batch_size=4, **kw)
    single = [cna_lens.generate(tiny_model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


@pytest.mark.parametrize("engine", ["cb", "shrink", "hf"])
def test_tokens_equal_an_independent_hf_generate(tiny_dir, tiny_model, prompts, engine):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    seqs = encode(tiny_model.tokenizer, prompts)
    want = _hf_generate_alone(hf, tiny_model.tokenizer, seqs, 10)
    assert greedy_tokens(tiny_model, seqs, 10, batch_size=3, engine=engine) == want


def test_a_sampling_generation_config_does_not_change_greedy_tokens(tmp_path, prompts):
    """Hub models ship sampling defaults (temperature, top-k, repetition penalty): evaluation stays greedy."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..conftest import make_tiny

    path = make_tiny(tmp_path / "tiny", "qwen2")
    GenerationConfig(
        do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.5, eos_token_id=257, bos_token_id=256
    ).save_pretrained(path)
    model = cna_lens.load_model(path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = encode(model.tokenizer, prompts)
    want = []
    for s in seqs:
        with torch.no_grad():
            ids = hf.generate(
                torch.tensor([s]),
                max_new_tokens=10,
                do_sample=False,
                repetition_penalty=1.0,
                top_k=None,
                temperature=None,
                pad_token_id=258,
                eos_token_id=257,
            )[0, len(s) :].tolist()
        want.append(ids[: ids.index(257)] if 257 in ids else ids)
    for engine in ("cb", "shrink", "hf"):
        assert greedy_tokens(model, seqs, 10, batch_size=4, engine=engine) == want, engine


@torch.no_grad()
def test_left_padding_invariance(tiny_dir, tiny_model, prompts):
    """Prompts padded to the longest one's width: the same tokens as alone, and logits as close to a
    float64 forward as HF's own unpadded fp32 forward gets (padding must not move positions or leak)."""
    from transformers import AutoModelForCausalLM

    seqs = encode(tiny_model.tokenizer, prompts)
    short, long = min(seqs, key=len), max(seqs, key=len)
    assert len(long) - len(short) > 50  # real padding
    alone = greedy_tokens(tiny_model, [short], 10, engine="hf")[0]
    for engine in ("hf", "shrink"):
        assert greedy_tokens(tiny_model, [long, short], 10, engine=engine)[1] == alone, engine
    ids, mask = left_pad(seqs, tiny_model.tokenizer.pad_token_id)
    padded = stock_model(tiny_model)(input_ids=ids, attention_mask=mask).logits.double()
    f64 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    f32 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    exact = [f64(torch.tensor([s])).logits[0] for s in seqs]
    # fp32 rounding on these random-init models reaches ~1e-5 of logits ~10 (amplified through the
    # layers, and varying 4x between prompts): the noise floor is the largest error of HF's own unpadded
    # fp32 forward over all prompts. Padded rows may reach twice that; a position or mask error is O(1).
    floor = max((f32(torch.tensor([s])).logits[0].double() - e).abs().max() for s, e in zip(seqs, exact))
    assert 0 < floor < 1e-3
    worst = max((padded[r, -len(s) :] - e).abs().max() for r, (s, e) in enumerate(zip(seqs, exact)))
    assert worst <= 2 * floor


@torch.no_grad()
def test_engine_shares_the_bridge_tensors(tiny_model, prompts):
    plain = stock_model(tiny_model)
    assert plain is stock_model(tiny_model)  # built once
    assert plain.config._attn_implementation == "sdpa"
    w = tiny_model.original_model.model.layers[1].mlp.down_proj.weight
    assert plain.model.layers[1].mlp.down_proj.weight.data_ptr() == w.data_ptr()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in tiny_model.original_model.parameters())


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.original_model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_edit_weights_restores_every_bit(tiny_model):
    ns = _some_neurons(tiny_model, k=60, seed=3)
    before = _digest(tiny_model)
    with cna_lens.edit_weights(tiny_model, ns, 0.37):
        assert _digest(tiny_model) != before
    assert _digest(tiny_model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with cna_lens.edit_weights(tiny_model, ns, 0.0):
            raise RuntimeError("boom")
    assert _digest(tiny_model) == before


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0])
def test_edit_and_stock_engine_equal_hooks_and_tl_generate(tiny_model, prompts, scale):
    """The evaluation path (exact weight edit, HF generate) against the interpretability path (TL hook,
    TL generate): the same greedy tokens (s ∈ {0, ½, 2} scales exactly in binary floating point)."""
    ns = _some_neurons(tiny_model, k=60, seed=3)
    seqs = encode(tiny_model.tokenizer, prompts)
    base = greedy_tokens(tiny_model, seqs, 10, batch_size=4)
    with cna_lens.edit_weights(tiny_model, ns, scale):
        assert engine_for(tiny_model) == "shrink"
        edited = greedy_tokens(tiny_model, seqs, 10, batch_size=4)
        assert greedy_tokens(tiny_model, seqs, 10, batch_size=4, engine="hf") == edited
        assert greedy_tokens(tiny_model, seqs, 10, batch_size=4, engine="cb") == edited
    with cna_lens.ablate(tiny_model, ns, scale):
        assert engine_for(tiny_model) == engine_for(tiny_model, "cb") == "tl" and tl_hooks_active(tiny_model)
        hooked = greedy_tokens(tiny_model, seqs, 10, batch_size=4)
    assert not tl_hooks_active(tiny_model)
    assert edited == hooked
    assert edited != base  # the intervention acts during generation


def test_caa_torch_hooks_equal_tl_steering(tiny_model, prompts):
    vectors = torch.randn(tiny_model.cfg.n_layers, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seqs = encode(tiny_model.tokenizer, prompts)
    with steer_mlp_out(tiny_model, vectors, 2.0):
        hf = greedy_tokens(tiny_model, seqs, 10, batch_size=4)
    with cna_lens.steer(tiny_model, vectors, 2.0):
        tl = greedy_tokens(tiny_model, seqs, 10, batch_size=4)
    assert hf == tl and hf != greedy_tokens(tiny_model, seqs, 10, batch_size=4)


def test_fwd_hooks_argument_routes_through_tl(tiny_model, prompts):
    ns = _some_neurons(tiny_model, k=60, seed=3)
    with cna_lens.ablate(tiny_model, ns):
        want = cna_lens.generate(tiny_model, prompts[:3], max_new_tokens=8, progress=False)
    got = cna_lens.generate(
        tiny_model, prompts[:3], max_new_tokens=8, progress=False, fwd_hooks=cna_lens.neuron_hooks(ns)
    )
    assert got == want and not tl_hooks_active(tiny_model)


def test_end_of_sequence_cuts_each_row(tiny_model, prompts):
    seqs = encode(tiny_model.tokenizer, prompts)
    free = greedy_tokens(tiny_model, seqs, 8, eos=[])
    eos = [free[0][2], free[2][0]]
    for engine in ("cb", "shrink", "hf", "tl"):
        stopped = greedy_tokens(tiny_model, seqs, 8, eos=eos, batch_size=3, engine=engine)
        for f, s in zip(free, stopped):
            cut = next((i for i, t in enumerate(f) if t in eos), len(f))
            assert s == f[:cut], engine
        assert len(stopped[2]) == 0 and len(stopped[0]) <= 2


def test_generate_many_texts_and_callback(tiny_model):
    ns = _some_neurons(tiny_model, k=60, seed=3)
    jobs = [(None, PROMPTS[:3]), (lambda: cna_lens.edit_weights(tiny_model, ns), PROMPTS[3:])]
    seen = {}
    texts = generate_many(
        tiny_model,
        jobs,
        max_new_tokens=6,
        batch_size=2,
        progress=False,
        on_done=lambda j, i, t: seen.update({(j, i): t}),
    )
    assert [len(t) for t in texts] == [3, len(PROMPTS) - 3]
    assert seen == {(j, i): t for j, job in enumerate(texts) for i, t in enumerate(job)}
    assert texts[0] == cna_lens.generate(tiny_model, PROMPTS[:3], max_new_tokens=6, progress=False)
    with cna_lens.ablate(tiny_model, ns):
        assert texts[1] == cna_lens.generate(tiny_model, PROMPTS[3:], max_new_tokens=6, progress=False)


def test_batches_by_length():
    assert batches_by_length([3, 9, 1, 7, 5], 2) == [[1, 3], [4], [0, 2]]  # longest first
    assert batches_by_length([4] * 10, 4) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]  # the fewest, even batches
    assert batches_by_length([], 4) == []


def test_processed_weights_generate_through_tl(tiny_dir, prompts):
    """Folded weights live in TL's coordinates: no stock engine, TL's generate instead."""
    model = cna_lens.load_model(tiny_dir, dtype=torch.float32, process_weights=True)
    with pytest.raises(ValueError, match="process_weights"):
        stock_model(model)
    assert engine_for(model) == engine_for(model, "hf") == "tl"
    assert len(cna_lens.generate(model, prompts[:2], max_new_tokens=3, progress=False)) == 2


def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        cna_lens.generate(tiny_model, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        cna_lens.generate(tiny_model, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        cna_lens.generate(tiny_model, ["hi"], batch_size=0)
    with pytest.raises(TypeError, match="jobs\\[0\\]"):
        generate_many(tiny_model, [([], ["hi"])])
    with pytest.raises(ValueError, match="engine 'vllm'"):
        cna_lens.generate(tiny_model, ["hi"], engine="vllm")
    with pytest.raises(TypeError, match="NeuronSet"):
        with cna_lens.edit_weights(tiny_model, [(0, 1)]):
            pass


def test_shrink_engine_fails_loudly_without_the_apis_it_uses(tiny_model):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``: either works, neither fails."""
    import inspect

    from cna_lens.speed import check_supported

    class NoCache:
        config = None

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
            raise AssertionError("not called")

    class NoPositions:
        config = None

        def forward(self, input_ids, attention_mask=None, past_key_values=None):
            raise AssertionError("not called")

    with pytest.raises(RuntimeError, match="needs cache or past_key_values, which"):
        check_supported(NoCache())
    with pytest.raises(RuntimeError, match="needs position_ids, use_cache, logits_to_keep, which"):
        check_supported(NoPositions())
    plain = stock_model(tiny_model)
    assert check_supported(plain) in {"cache", "past_key_values"} & set(inspect.signature(plain.forward).parameters)


def test_shrink_engine_reports_each_row_as_it_finishes(tiny_model, prompts):
    """Rows leave the batch when they end: each is reported once, ended rows before the rest."""
    from cna_lens.speed import shrink_generate

    seqs = encode(tiny_model.tokenizer, prompts[:4])
    free = greedy_tokens(tiny_model, seqs, 8, eos=[], engine="hf")
    eos = [free[1][0]]  # row 1 ends at its first step
    plain = stock_model(tiny_model)
    ids, mask = left_pad(seqs, tiny_model.tokenizer.pad_token_id)
    order = []
    out = shrink_generate(plain, ids, mask, 8, eos, on_row=lambda r, t: order.append((r, list(t))))
    assert sorted(r for r, _ in order) == [0, 1, 2, 3] and order[0] == (1, [])
    assert [t for _, t in sorted(order)] == out
    for f, o in zip(free, out):
        assert o == f[: next((i for i, t in enumerate(f) if t in eos), len(f))]


def test_shared_prefix_and_its_rearrangement():
    from cna_lens.speed.shrink import prefix_first, shared_prefix

    seqs = [[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 8]]
    ids, mask = left_pad(seqs, 0)
    assert shared_prefix(ids, mask) == 3
    assert shared_prefix(ids[:1], mask[:1]) == 0  # one row: nothing to share
    assert shared_prefix(*left_pad([[5, 6], [5, 6, 7]], 0)) == 1  # each row keeps a token after it
    assert shared_prefix(*left_pad([[1, 6, 7], [5, 6, 7]], 0)) == 0
    new_ids, new_mask = prefix_first(ids, mask, 3)
    assert new_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 1], [5, 6, 7, 0, 8]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 0, 1]]


def test_shrink_shares_the_prefix_and_still_equals_hf_alone(tiny_dir, tiny_model, prompts):
    """Chat prompts share their template's head, and a long common prefix changes no token: the
    prefix prefilled once and repeated gives what each prompt gives alone."""
    from transformers import AutoModelForCausalLM

    from cna_lens.speed.shrink import shared_prefix

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    chat = encode(tiny_model.tokenizer, prompts)
    assert shared_prefix(*left_pad(chat, tiny_model.tokenizer.pad_token_id)) > 0  # the path is taken
    head = torch.randint(5, 200, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    seqs = [head + s for s in chat]
    assert shared_prefix(*left_pad(seqs, tiny_model.tokenizer.pad_token_id)) >= 40
    want = _hf_generate_alone(hf, tiny_model.tokenizer, seqs, 10)
    assert greedy_tokens(tiny_model, seqs, 10, batch_size=3, engine="shrink") == want


@pytest.mark.parametrize("scale", [None, 0.5])
def test_first_token_logprobs_from_the_prefill_equal_the_scoring_pass(tiny_model, prompts, scale):
    """``on_first`` returns, from the decoding's own prefill (shared prefix, batches by length, a weight
    edit), what the scoring path computes under TL hooks (:func:`final_logprobs`, one batch), up to fp32
    summation order (log-softmax at most doubles a logit's error); capturing them changes no token."""
    from cna_lens.evaluate import final_logprobs

    from ..helpers import assert_close_model

    ns = _some_neurons(tiny_model, k=60, seed=3)
    edit = (lambda: cna_lens.edit_weights(tiny_model, ns, scale)) if scale is not None else contextlib.nullcontext
    hook = (lambda: cna_lens.ablate(tiny_model, ns, scale)) if scale is not None else contextlib.nullcontext
    got: dict[int, torch.Tensor] = {}

    def keep(job, rows, logprobs):
        assert job == 0 and logprobs.dtype == torch.float32 and logprobs.shape[0] == len(rows)
        got.update(zip(rows, logprobs))

    kw = dict(max_new_tokens=4, batch_size=3, progress=False)
    with edit():
        texts = generate_many(tiny_model, [(None, prompts)], on_first=keep, **kw)[0]
        assert texts == cna_lens.generate(tiny_model, prompts, **kw)
    assert sorted(got) == list(range(len(prompts)))  # every row once, in 2 batches
    with hook():
        want = final_logprobs(tiny_model, prompts, batch_size=len(prompts))
        ids, mask = left_pad(encode(tiny_model.tokenizer, prompts), tiny_model.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = tiny_model(ids, attention_mask=mask)
    assert_close_model(
        torch.stack([got[i] for i in range(len(prompts))]), want, tiny_model, scale=2 * float(logits.abs().max())
    )


def test_first_token_logprobs_need_the_shrink_engine(tiny_model, prompts):
    """Asking another engine for them fails before any work; :func:`generate_scored` then returns None."""
    from cna_lens.generation import generate_scored

    seqs = encode(tiny_model.tokenizer, prompts[:2])
    kw = dict(max_new_tokens=2, progress=False)
    texts, first = generate_scored(tiny_model, prompts[:2], **kw)
    assert texts == cna_lens.generate(tiny_model, prompts[:2], **kw) and first.shape[0] == 2
    assert generate_scored(tiny_model, prompts[:2], engine="hf", **kw) == (texts, None)
    hook = [("blocks.0.mlp.hook_post", lambda act, hook: act)]  # an identity TL hook: TL's generate runs
    assert generate_scored(tiny_model, prompts[:2], fwd_hooks=hook, **kw) == (texts, None)
    with pytest.raises(ValueError, match="needs the 'shrink' engine; the 'hf' engine"):
        greedy_tokens(tiny_model, seqs, 2, engine="hf", on_first=lambda rows, lp: None)
    with cna_lens.ablate(tiny_model, _some_neurons(tiny_model, k=4, seed=0), 0.0):  # TL hooks: TL's generate
        with pytest.raises(ValueError, match="the 'tl' engine runs now"):
            generate_many(tiny_model, [(None, prompts[:2])], max_new_tokens=2, on_first=lambda *a: None, progress=False)


@pytest.mark.parametrize("engine", ["shrink", "hf"])
def test_response_prefix_per_prompt(tiny_dir, tiny_model, prompts, engine):
    """One answer prefix per prompt, decoded together in batches, equals each prompt generated alone with
    its prefix, and an independent HF generate of the prompt's ids followed by the prefix's."""
    from transformers import AutoModelForCausalLM

    prefixes = ["Sure, here is", "", " Step 1:", "No"][: len(prompts)]
    prefixes += ["Sure"] * (len(prompts) - len(prefixes))
    kw = dict(max_new_tokens=6, progress=False, engine=engine)
    together = cna_lens.generate(tiny_model, prompts, batch_size=3, response_prefix=prefixes, **kw)
    alone = [cna_lens.generate(tiny_model, [p], response_prefix=r, **kw)[0] for p, r in zip(prompts, prefixes)]
    assert together == alone
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = tiny_model.tokenizer
    seqs = [encode(tok, [p], response_prefix=r)[0] for p, r in zip(prompts, prefixes)]
    assert seqs[1] == encode(tok, [prompts[1]])[0] and len(seqs[0]) > len(encode(tok, [prompts[0]])[0])
    want = [tok.decode(t, skip_special_tokens=True) for t in _hf_generate_alone(hf, tok, seqs, 6)]
    assert together == want
    assert cna_lens.generate(tiny_model, prompts, response_prefix="", **kw) == cna_lens.generate(
        tiny_model, prompts, **kw
    )


def test_response_prefix_bad_input(tiny_model, prompts):
    """A list of the wrong length or with a non-string fails before any generation."""
    for bad in (["x"] * (len(prompts) + 1), [None] * len(prompts)):
        with pytest.raises(ValueError, match="one string for every prompt"):
            cna_lens.generate(tiny_model, prompts, response_prefix=bad, progress=False)
