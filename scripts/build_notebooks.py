"""Write notebooks/0*.ipynb from the cell sources below (outputs are added by executing them).

python scripts/build_notebooks.py [01_quickstart.ipynb ...]    # all notebooks when none is named
"""

import sys
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = '''import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import plotly.io as pio
import torch
import cna_lens
from cna_lens import plot
# interactive in Jupyter; scripts/run_notebooks.py adds static PNGs so the saved outputs show on GitHub
pio.renderers.default = os.environ.get("CNA_LENS_RENDERER", pio.renderers.default)
from cna_lens.datasets import load_prompts
RUNS = Path(os.environ.get("CNA_LENS_RUNS", "runs"))

def cached_attribution(model, name, hook="mlp.hook_post"):
    """Discovery on the paper's prompt sets, saved under runs/ and reused on the next run."""
    path = RUNS / name / ("attribution" if hook == "mlp.hook_post" else hook)
    if (path / "attribution.json").exists():
        return cna_lens.Attribution.load(path)
    attr = cna_lens.attribute(model, load_prompts("discovery_harmful"), load_prompts("discovery_harmless"),
                              batch_size=16, hook=hook)
    attr.save(path)
    return attr'''

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        (
            "md",
            "# CNA quickstart\n\nContrastive Neuron Attribution on a packaged chat model: discover the MLP neurons whose "
            "final-token activation separates harmful from harmless prompts, then ablate them during generation.\n\n"
            "The first cell picks the model: the tiny packaged `smollm2-135m-instruct` runs anywhere in a minute (it never "
            "refuses, so it shows the mechanics only); `qwen2.5-coder-1.5b-instruct` is the real run whose outputs are saved here.",
        ),
        (
            "code",
            'MODEL = "smollm2-135m-instruct"  # or "qwen2.5-coder-1.5b-instruct"\n'
            'DTYPE = "auto"  # bfloat16 where the hardware runs it natively, else float32\n'
            "FRACTION = 0.003\nN_EVAL = 6\nMAX_NEW_TOKENS = 48\n"
            'JUDGE = "default"  # the MiniLM classifier; "regex" is instant but cannot say evade',
        ),
        ("code", SETUP),
        (
            "code",
            "model = cna_lens.load_model(MODEL, dtype=DTYPE)\nprint(model.cfg.n_layers, 'layers x', model.cfg.d_mlp, 'MLP neurons,', next(model.parameters()).dtype)",
        ),
        (
            "md",
            "## Discovery\n`diff = mean(harmful) − mean(harmless)` of `blocks.L.mlp.hook_post` at the final prompt token, "
            "ranked globally by |diff| with layers 0–1 excluded.",
        ),
        (
            "code",
            "attr = cached_attribution(model, MODEL)\nneurons = attr.top_neurons(fraction=FRACTION, by='abs')\n"
            "print(len(neurons), 'neurons; per layer:', {l: c for l, c in enumerate(neurons.per_layer_counts()) if c})",
        ),
        ("code", "plot.layer_histogram(neurons, f'{MODEL}: top {100 * FRACTION:g} % of MLP neurons by |diff|')"),
        ("code", "plot.attribution_heatmap(attr, top_n=48, exclude_layers=(0, 1))"),
        (
            "md",
            "## Ablation during generation\nThe selected neurons are multiplied by 0 at every position, prompt and generated tokens alike. "
            "`cna_lens.edit_weights` does it as a weight edit: column *i* of layer L's `down_proj` times 0 is the same linear map "
            "as neuron *i* of `blocks.L.mlp.hook_post` times 0, and the stock engine generates on the edited weights. "
            "`cna_lens.ablate` does it with TransformerLens hooks, which any TL call sees (generating under them runs "
            "TL's own `generate`, which has no working KV cache with transformers ≥ 5.24, so it is much slower).",
        ),
        (
            "code",
            "from cna_lens.evaluate import judge, quality\nprompts = load_prompts('jbb_harmful', limit=N_EVAL)\n"
            "base = cna_lens.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS)\n"
            "with cna_lens.edit_weights(model, neurons, scale=0.0):\n    ablated = cna_lens.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS)\n"
            "for p, b, a in zip(prompts, base, ablated):\n"
            '    print(f\'PROMPT: {p}\\n  baseline [{"refuses" if judge(b).refused else "complies"}]: {b[:160]!r}\\n\'\n'
            '          f\'  ablated  [{"refuses" if judge(a).refused else "complies"}]: {a[:160]!r}\\n\')\n'
            "print('refusals: baseline', sum(judge(t).refused for t in base), '/ ablated', sum(judge(t).refused for t in ablated),\n"
            "      'of', len(prompts), '| quality', round(sum(map(quality, ablated)) / len(ablated), 3))",
        ),
        (
            "code",
            "# the hook and the weight edit are the same map: next-token logits of the first prompt under each\n"
            "from cna_lens.prompts import encode\ntokens = torch.tensor(encode(model.tokenizer, prompts[:1]))\n"
            "with torch.no_grad(), cna_lens.ablate(model, neurons, scale=0.0):\n    hooked = model(tokens)[0, -1].float()\n"
            "with torch.no_grad(), cna_lens.edit_weights(model, neurons, scale=0.0):\n    edited = model(tokens)[0, -1].float()\n"
            "with torch.no_grad():\n    plain = model(tokens)[0, -1].float()\n"
            "print(f'max |hooked - edited| = {(hooked - edited).abs().max():.2e} logits; the ablation itself moves them by up to '\n"
            "      f'{(hooked - plain).abs().max():.2f}; same next token: {bool(hooked.argmax() == edited.argmax())}')",
        ),
        (
            "md",
            "## Three-way judge\nA refusal-phrase check calls everything without a refusal phrase compliance. "
            "`cna_lens.judge_completions` labels each completion **refuse / comply / evade** (evade: no refusal, but no "
            'delivery either: the opposite of the request, a lecture, a question back, empty text). `judge="default"` is '
            'the MiniLM classifier validated against human labels; `"regex"` is the phrase check (instant, never says evade); '
            '`"model:<id>"` asks a language model. Labels, judges and their measured agreement: `docs/judge.md`.',
        ),
        (
            "code",
            "from cna_lens.judge import rates\nv_base = cna_lens.judge_completions(prompts, base, judge=JUDGE)\n"
            "v_abl = cna_lens.judge_completions(prompts, ablated, judge=JUDGE)\nfor p, b, a in zip(prompts, v_base, v_abl):\n"
            "    print(f'{b.label:>7} -> {a.label:<7} ({a.confidence:.2f})  {p[:80]}')\n"
            "for name, vs in (('baseline', v_base), ('ablated', v_abl)):\n"
            "    print(f'{name:>8} [{vs[0].judge}]:', {k: round(v, 2) for k, v in rates(vs).items()})",
        ),
        (
            "md",
            "## Export the edited model\nScaling neuron *i* of `blocks.L.mlp.hook_post` by 0 is the same as zeroing column *i* "
            "of layer L's `down_proj` weight. `cna_lens.export_model` writes the model with that edit as a plain Hugging Face "
            'checkpoint (or a GGUF file for llama.cpp, `format="gguf"`), and stock `transformers` runs it with no hooks and '
            "no cna_lens. Its greedy tokens should be the edited model's above, up to float rounding (`docs/edit-and-export.md`).",
        ),
        (
            "code",
            "from transformers import AutoModelForCausalLM\nfrom cna_lens.prompts import encode\n"
            "out = cna_lens.export_model(model, RUNS / 'edited', neurons=neurons, scale=0.0, force=True)\n"
            "print(sorted(p.name for p in out.iterdir()))\n"
            "plain = AutoModelForCausalLM.from_pretrained(out, dtype=next(model.parameters()).dtype)  # transformers only\n"
            "tok = model.tokenizer\nfor p, a in zip(prompts, ablated):\n"
            "    ids = torch.tensor([encode(tok, [p])[0]])\n"
            "    gen = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,\n"
            "                         pad_token_id=tok.pad_token_id)\n"
            "    first = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)\n"
            '    print(f\'{"same" if a.startswith(first) else "DIFFERENT"}  exported: {first!r}  edited: {a[:len(first) + 10]!r}\')',
        ),
    ],
    "02_circuit_maps.ipynb": [
        (
            "md",
            "# Circuit maps: where does the refusal gate live?\n\nAblate the selected neurons one layer at a time (and "
            "cumulatively from the top or the bottom), then one neuron at a time, and measure the change of the first-token "
            "refusal log-odds `log p(R) − log(1 − p(R))`, R = first tokens of 'I', 'Sorry', 'As', … averaged over harmful prompts.",
        ),
        (
            "code",
            'MODEL = "smollm2-135m-instruct"  # or "qwen2.5-coder-1.5b-instruct"\n'
            'DTYPE = "auto"  # bfloat16 where the hardware runs it natively, else float32\n'
            "FRACTION = 0.001\nN_EVAL = 8\nTOP_N = 10",
        ),
        ("code", SETUP),
        (
            "code",
            "model = cna_lens.load_model(MODEL, dtype=DTYPE)\nattr = cached_attribution(model, MODEL)\n"
            "neurons = attr.top_neurons(fraction=FRACTION, by='abs')\nprompts = load_prompts('jbb_harmful', limit=N_EVAL)\nlen(neurons)",
        ),
        (
            "code",
            "from cna_lens.circuits import layer_map, neuron_effects\nlm = layer_map(model, neurons, prompts)\n"
            "lm.save(RUNS / MODEL / 'layer_map')\nprint('baseline mean refusal log-odds', round(lm.baseline, 3))\nplot.circuit_map(lm)",
        ),
        (
            "code",
            "effects = neuron_effects(model, neurons, prompts, top_n=TOP_N)\neffects.save(RUNS / MODEL / 'neuron_effects.json')\n"
            "for row in effects.table()[:10]:\n    print(f\"rank {row['rank']:>3}  L{row['layer']:<3} n{row['neuron']:<6} diff {row['score']:+.3f}  Δ {row['delta']:+.4f}\")",
        ),
    ],
    "03_base_vs_instruct.ipynb": [
        (
            "md",
            "# Base vs instruct, neuron by neuron\n\nFor two models of the same architecture (e.g. `Qwen/Qwen2.5-1.5B` vs "
            "`Qwen/Qwen2.5-1.5B-Instruct`, or `meta-llama/Llama-3.2-1B` vs `-Instruct`, when online) compare the CNA "
            "attributions: per-layer Spearman ρ of diff, Jaccard of the top sets, a neuron table, and cross-application "
            "(ablate A's neurons in B). No matched base/instruct pair is available offline, so by default model B is a copy "
            "of model A with Gaussian noise added to its MLP weights (`PERTURB`); set `MODEL_B` to a real pair to run it for real.",
        ),
        (
            "code",
            'MODEL_A = "smollm2-135m-instruct"\nDTYPE = "auto"\nMODEL_B = None  # e.g. "Qwen/Qwen2.5-1.5B" vs MODEL_A = "Qwen/Qwen2.5-1.5B-Instruct"\n'
            "PERTURB = 0.5  # relative noise on MLP weights for the offline stand-in B\nFRACTION = 0.001\nN_EVAL = 8\n"
            'CROSS_SIZE = ["results/foundation-qwen2.5-coder-1.5b-instruct/attribution", '
            '"results/reproduce-qwen2.5-coder-0.5b-instruct/attribution"]',
        ),
        ("code", SETUP),
        (
            "code",
            "import tempfile\nfrom cna_lens.models import resolve\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model_a = cna_lens.load_model(MODEL_A, dtype=DTYPE)\nif MODEL_B is None:  # offline stand-in: A with perturbed MLP weights\n"
            "    src, _ = resolve(MODEL_A)\n    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)\n"
            "    g = torch.Generator().manual_seed(0)\n    with torch.no_grad():\n        for layer in hf.model.layers:\n"
            "            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):\n"
            "                lin.weight += PERTURB * lin.weight.std() * torch.randn(lin.weight.shape, generator=g)\n"
            "    with tempfile.TemporaryDirectory(prefix='perturbed-') as tmp:  # loaded into memory, then deleted\n"
            "        hf.save_pretrained(tmp)\n        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)\n        del hf\n"
            "        model_b = cna_lens.load_model(tmp, dtype=DTYPE)\nelse:\n    model_b = cna_lens.load_model(MODEL_B, dtype=DTYPE)\n"
            "attr_a = cached_attribution(model_a, 'A-' + Path(MODEL_A).name)\n"
            "attr_b = cna_lens.attribute(model_b, load_prompts('discovery_harmful'), load_prompts('discovery_harmless'))",
        ),
        (
            "code",
            "from cna_lens.compare import compare, cross_apply, layer_profile\nc = compare(attr_a, attr_b, ks=(10, 50, 250))\n"
            "print('Jaccard of top-k:', {k: round(v, 3) for k, v in c.jaccard.items()})\n"
            "print('Spearman rho per layer:', [round(r, 2) for r in c.rank_corr])\nfor row in c.table[:10]:\n    print(row)",
        ),
        (
            "code",
            "top_a = attr_a.top_neurons(fraction=FRACTION)\ntop_b = attr_b.top_neurons(fraction=FRACTION)\n"
            "plot.neuron_scatter(attr_a, attr_b, top_a, top_b)",
        ),
        (
            "code",
            "prompts = load_prompts('jbb_harmful', limit=N_EVAL)\nfor name, m, ns in (('A set in B', model_b, top_a), ('B set in B', model_b, top_b), ('A set in A', model_a, top_a)):\n"
            "    r = cross_apply(m, ns, prompts)\n    print(f\"{name}: refusal log-odds {r['baseline_score']:+.3f} -> {r['ablated_score']:+.3f} (delta {r['delta']:+.3f})\")",
        ),
        (
            "md",
            "## Across sizes: depth-normalized profiles\nNeuron i of a 24-layer model has nothing to do with neuron i of a 28-layer "
            "one, so `compare` refuses; the share of the top set by relative depth is comparable. This uses the saved "
            "attributions of the two packaged Qwen2.5-Coder instruct models when they are present.",
        ),
        (
            "code",
            "profiles = {}\nfor path in CROSS_SIZE:\n    if Path(path, 'attribution.json').exists():\n"
            "        a = cna_lens.Attribution.load(path)\n        profiles[f'{a.model_name} ({a.n_layers}x{a.d_mlp})'] = layer_profile(a.top_neurons(fraction=FRACTION))\n"
            "try:\n    compare(*[cna_lens.Attribution.load(p) for p in CROSS_SIZE])\nexcept (ValueError, FileNotFoundError) as e:\n    print('compare:', e)\n"
            "plot.layer_profiles(profiles) if profiles else 'no saved attributions found'",
        ),
    ],
}


def build(names: list[str] | None = None) -> None:
    """Write the notebooks in ``names`` (all when empty); a rewritten notebook has no outputs."""
    unknown = sorted(set(names or ()) - NOTEBOOKS.keys())
    if unknown:
        raise SystemExit(f"unknown notebooks {unknown}; choose from {sorted(NOTEBOOKS)}")
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, ROOT / name)


if __name__ == "__main__":
    build(sys.argv[1:])
