"""Export an ablated model and check it against the hooked model: time, size, |Δlogit|, greedy tokens.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/export_parity.py            # SmolLM2-135M, fp32
    python benchmarks/export_parity.py --model qwen2.5-coder-0.5b-instruct --neurons runs/x/neurons.json

The neurons come from CNA discovery on the bundled discovery sets (top ``--fraction`` by |diff|,
layers 0-1 excluded) unless ``--neurons`` gives a saved set. For each format (HF directory, GGUF
f16, GGUF q8_0) the edited model is exported with ``cna_lens.export_model`` and loaded back with
plain ``transformers.AutoModelForCausalLM.from_pretrained`` (the GGUF files through transformers'
GGUF loader, which dequantizes to fp32). Compared with the hooked model (``cna_lens.ablate``) on
``--prompts`` JBB-harmful prompts as one left-padded batch: the largest |Δlogit| over every real
position and vocabulary entry, and whether the greedy continuations agree token for token (hooked:
full forwards without a cache; exported: ``generate(do_sample=False)`` with the KV cache).
Prints a markdown table and writes ``<out>/export_parity-<model>.json``; ``--show <json>`` prints the
table of a saved result.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.prompts import encode, left_pad
from cna_lens.runs import atomic_write_json

FORMATS = (("hf", None), ("gguf", "f16"), ("gguf", "q8_0"))


def hooked_greedy(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation of a left-padded batch by full forwards (no cache, no generation engine)."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -n:]


def reload(out: Path, gguf_type: str | None):
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": f"model-{gguf_type}.gguf"} if gguf_type else {}
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--neurons", help="a saved neurons.json (default: run discovery)")
    ap.add_argument("--fraction", type=float, default=0.003, help="share of MLP neurons selected by discovery")
    ap.add_argument("--prompts", type=int, default=8, help="JBB-harmful prompts compared")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens compared")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved result and exit")
    args = ap.parse_args()
    if args.show:
        print(markdown(json.loads(Path(args.show).read_text(encoding="utf-8"))))
        return

    model = cna_lens.load_model(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    if args.neurons:
        neurons = cna_lens.NeuronSet.load(args.neurons)
        how = args.neurons
    else:
        attr = cna_lens.attribute(model, load_prompts("discovery_harmful"), load_prompts("discovery_harmless"))
        neurons = attr.top_neurons(fraction=args.fraction, by="abs")
        how = f"discovery, top {100 * args.fraction:g} % by |diff|"
    discover_s = time.perf_counter() - t0
    prompts = load_prompts("jbb_harmful", limit=args.prompts)
    ids, mask = left_pad(encode(model.tokenizer, prompts), model.tokenizer.pad_token_id)
    real = mask.bool()
    with torch.no_grad():
        base = model(ids, attention_mask=mask)
    with cna_lens.ablate(model, neurons, 0.0):
        with torch.no_grad():
            hooked = model(ids, attention_mask=mask)
        hooked_tokens = hooked_greedy(model, ids, mask, args.tokens)
    effect = float((hooked - base)[real].abs().max())

    rows = []
    with tempfile.TemporaryDirectory(prefix="export-parity-") as tmp:
        for fmt, qtype in FORMATS:
            out = Path(tmp) / f"{fmt}-{qtype or 'model'}"
            t0 = time.perf_counter()
            cna_lens.export_model(model, out, neurons=neurons, scale=0.0, format=fmt, gguf_type=qtype or "f16")
            export_s = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            t0 = time.perf_counter()
            back = reload(out, qtype)
            reload_s = time.perf_counter() - t0
            with torch.no_grad():
                got = back(ids, attention_mask=mask).logits
                gen = back.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    pad_token_id=model.tokenizer.pad_token_id,
                )[:, -args.tokens :]
            diff = (got - hooked)[real].abs()
            rows.append(
                {
                    "format": fmt if qtype is None else f"gguf {qtype}",
                    "export_s": round(export_s, 2),
                    "reload_s": round(reload_s, 2),
                    "size_mb": round(size / 1e6, 1),
                    "max_abs_dlogit": float(diff.max()),
                    "max_abs_logit": float(hooked[real].abs().max()),
                    "next_token_agree": int((got[:, -1].argmax(-1) == hooked[:, -1].argmax(-1)).sum()),
                    "greedy_rows_identical": int((gen == hooked_tokens).all(-1).sum()),
                    "greedy_tokens_agree": int((gen == hooked_tokens).sum()),
                }
            )
            del back

    result = {
        "kind": "cna_lens.ExportParity",
        "format_version": 1,
        "model": args.model,
        "dtype": "float32",
        "neurons": len(neurons),
        "neuron_source": how,
        "discover_s": round(discover_s, 1),
        "prompts": len(prompts),
        "tokens": args.tokens,
        "ablation_max_abs_dlogit": effect,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "versions": {"cna_lens": cna_lens.__version__, "torch": torch.__version__},
        "rows": rows,
    }
    out_dir = Path(args.out)
    atomic_write_json(out_dir / f"export_parity-{args.model}.json", result)
    print(markdown(result))


def markdown(result: dict) -> str:
    """The result as a heading line and a markdown table."""
    n, t = result["prompts"], result["tokens"]
    lines = [
        f"{result['model']}, {result['dtype']}, {result['neurons']} neurons ({result['neuron_source']}) × 0; "
        f"{n} JBB prompts; the ablation itself moves the logits by up to {result['ablation_max_abs_dlogit']:.1f} "
        f"(largest |logit| {result['rows'][0]['max_abs_logit']:.1f})",
        "",
        "| export | export s | size MB | reload s | max abs Δlogit vs hook | next token = hook | "
        f"greedy {t} tokens = hook (rows) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['format']} | {r['export_s']:.1f} | {r['size_mb']:.1f} | {r['reload_s']:.1f} | "
            f"{r['max_abs_dlogit']:.1e} | {r['next_token_agree']}/{n} | {r['greedy_rows_identical']}/{n} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
