"""Helpers shared by unit and integration tests: batches, logits, greedy tokens, weight digests, random
neuron sets, reference activations, and the fp32 tolerance of a whole model (tests/tolerance.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from cna_lens.edit import hf_model
from cna_lens.neurons import NeuronSet
from cna_lens.prompts import encode, left_pad

from .tolerance import assert_close_fp32, fp32_atol


# --------------------------------------------------------------------------- tolerances
def model_atol(model, scale: float) -> float:
    """:func:`fp32_atol` for a value that ``model`` computes two ways: ``k = max(d_mlp, d_model)`` (the
    longest sum: the down projection or a residual-width projection) and ``depth = 2·n_layers`` (an
    attention and an MLP write per block). Valid for any activation or logit of the model."""
    cfg = model.cfg
    return fp32_atol(scale, max(cfg.d_mlp, cfg.d_model), 2 * cfg.n_layers)


def logit_tol(model, logits: torch.Tensor) -> float:
    """:func:`model_atol` at the largest logit: the bound on |Δlogit| between two summation orders."""
    return model_atol(model, float(logits.abs().max()))


def assert_close_model(got: torch.Tensor, expected: torch.Tensor, model, scale: float | None = None) -> None:
    """``got`` equals ``expected`` up to fp32 summation order in ``model`` (:func:`model_atol`; ``scale``
    as in :func:`assert_close_fp32`)."""
    cfg = model.cfg
    assert_close_fp32(got, expected, k=max(cfg.d_mlp, cfg.d_model), depth=2 * cfg.n_layers, scale=scale)


def activation_scale(attr) -> float:
    """The largest per-neuron RMS activation of an Attribution (both sets). A mean of n activations
    whose errors are each ≤ c·|a_i| is off by ≤ c·mean|a_i| ≤ c·RMS, so this is the scale for the
    rounding error of means, diffs and (by the triangle inequality) standard deviations."""
    rms = lambda s2, n: (s2 / max(n, 1)).sqrt().max()  # noqa: E731
    return float(max(rms(attr.sumsq_pos, attr.n_pos), rms(attr.sumsq_neg, attr.n_neg)))


# --------------------------------------------------------------------------- models and batches
def digest(model) -> str:
    """sha256 over the raw bytes of every parameter and buffer (names included)."""
    h = hashlib.sha256()
    for name, t in sorted(hf_model(model).state_dict(keep_vars=False).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def random_neurons(model, per_layer: int = 10, seed: int = 0) -> NeuronSet:
    """``per_layer`` random neurons in every layer (seeded)."""
    g = torch.Generator().manual_seed(seed)
    layers, idx = [], []
    for layer in range(model.cfg.n_layers):
        for i in torch.randperm(model.cfg.d_mlp, generator=g)[:per_layer].tolist():
            layers.append(layer)
            idx.append(i)
    return NeuronSet(tuple(layers), tuple(idx), (0.0,) * len(idx), model.cfg.n_layers, model.cfg.d_mlp)


def batch(model, prompts):
    """Prompts as one left-padded batch (every row's final real token at -1)."""
    return left_pad(encode(model.tokenizer, prompts), model.tokenizer.pad_token_id)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def real(x, mask):
    """Logits at real (unpadded) positions: padded ones are undefined and engines fill them differently."""
    return x[mask.bool()]


def greedy(model, prompt: str, n: int = 8) -> list[int]:
    """Greedy continuation by full forwards (no cache: independent of any generation engine)."""
    ids = torch.tensor([encode(model.tokenizer, [prompt])[0]])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


def hooked_greedy(model, ids, mask, n: int = 6):
    """Greedy continuation of a left-padded batch by full forwards (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -n:]


def hf_down_proj_inputs(hf, seqs):
    """Final-token input of every layer's ``mlp.down_proj``, one prompt at a time (no padding)."""
    rows = []
    for s in seqs:
        captured = {}
        handles = [
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda mod, args, i=i, c=captured: c.__setitem__(i, args[0][0, -1].detach().clone())
            )
            for i, layer in enumerate(hf.model.layers)
        ]
        try:
            with torch.no_grad():
                hf(torch.tensor([s]))
        finally:
            for h in handles:
                h.remove()
        rows.append(torch.stack([captured[i] for i in range(len(hf.model.layers))]))
    return torch.stack(rows)


# --------------------------------------------------------------------------- exported checkpoints
#: Runs in a fresh interpreter: transformers only, never cna_lens. argv[1]: a JSON file listing checkpoints
#: with the token ids and mask to run; each gets logits, 6 greedy tokens and its chat template.
RELOAD = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
infos, n = [], 6
for job in json.load(open(sys.argv[1])):
    out, ids, mask = job["out"], torch.tensor(job["ids"]), torch.tensor(job["mask"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    save_file({"logits": logits, "tokens": gen[:, -n:].contiguous()}, out + ".check.safetensors")
    chat = [{"role": "user", "content": "Hi"}]
    infos.append({"template": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)})
assert "cna_lens" not in sys.modules
print(json.dumps(infos))
"""


def reload_in_subprocess(*checkpoints):
    """For each ``(out, ids, mask)``: the logits, 6 greedy tokens (HF generate) and chat template of the
    checkpoint ``out``, from one fresh interpreter that imports transformers only (one start for all)."""
    from safetensors.torch import load_file

    jobs = [{"out": str(out), "ids": ids.tolist(), "mask": mask.tolist()} for out, ids, mask in checkpoints]
    spec = Path(str(checkpoints[0][0]) + ".jobs.json")
    spec.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(spec)],
        capture_output=True,
        text=True,
        timeout=300 * len(jobs),
        env={
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            **{k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY",) if k in os.environ},  # the same kernels
        },
    )
    spec.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = json.loads(proc.stdout.strip().splitlines()[-1])
    got = [load_file(job["out"] + ".check.safetensors") for job in jobs]
    return [(g["logits"], g["tokens"], info) for g, info in zip(got, infos)]
