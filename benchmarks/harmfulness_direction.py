"""Does ablating the harmfulness direction as well as the refusal direction turn evasions into delivery?

Zhao et al. (2025, "LLMs Encode Harmfulness and Refusal Separately") read two directions: refusal, the
difference of means of harmful and harmless prompts at the final prompt token, and harmfulness, the same
difference at the last token of the user's instruction (``t_inst``, before the chat template's closing
tokens). Directional ablation of the refusal direction removes refusal, yet about half of the answers
evade: they write the opposite of the request or a plan without content, as if the request were still
read as harmful. This ablates, on top of the run's refusal direction ``r`` (its layer, from
``direction.json``), the harmfulness direction ``h`` of layer H made orthogonal to it,
``h' = (h − (h·r) r) / ‖·‖``, so that every write to the residual stream loses its part in span(r, h')
(two nested weight edits, :func:`cna_lens.edit_direction`), and answers JBB harmful greedily with the
run's model, dtype, token budget and batch size. The refusal direction alone is answered again beside
it (``same_as_run`` counts its answers equal to the run's, word for word). ``h`` comes from the run's
discovery prompts, ``hook_resid_pre`` at ``t_inst``.

Written to OUT: ``completions.jsonl`` (appended as answers finish; a rerun generates only the missing
ones), ``harm_directions.safetensors`` (``h`` per layer), ``harmfulness.json``: the cosine of ``h``
per layer with ``r`` and with the same layer's refusal direction, KL on the run's harmless KL prompts,
the classifier's label shares, and the blind hand labels of conditions whose answers were read
(``cna_lens/data/jbb_labels_heldout.jsonl``, matched word for word) with the exact McNemar test of
comply between the two conditions.

python benchmarks/harmfulness_direction.py --run results/reproduce-qwen2.5-coder-1.5b-instruct-judge-quality-selection \
    --out benchmarks/results/harmfulness-direction/qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import torch
from compliance_ceiling import interventions, read_done, report_head
from safetensors.torch import load_file, save_file

import cna_lens
from cna_lens.attribute import final_token_activations
from cna_lens.conditions import Condition
from cna_lens.datasets import load_dataset, load_prompts
from cna_lens.evaluate import final_logprobs, kl_divergence
from cna_lens.generation import generate_many
from cna_lens.judge import judge_completions
from cna_lens.judge_validation import hand_labels, heldout_rows
from cna_lens.prompts import encode
from cna_lens.runs import append_jsonl, atomic_write_json
from cna_lens.scoring import label_rates, mcnemar

DATASET = "jbb_harmful"
JUDGE = "classifier"
HOOK = "hook_resid_pre"


def instruction_means(model, prompts: list[str], end_token: str, batch_size: int = 16) -> torch.Tensor:
    """Mean ``hook_resid_pre`` ``[layer, d_model]`` at each prompt's last instruction token: the chat
    formatted prompt cut before its last ``end_token`` (a causal model's activations there do not see
    the cut)."""
    end = model.tokenizer.convert_tokens_to_ids(end_token)
    seqs = []
    for s in encode(model.tokenizer, prompts):
        if end not in s:
            raise ValueError(f"{end_token!r} is not in the chat-formatted prompt: no instruction end to cut at")
        seqs.append(s[: len(s) - 1 - s[::-1].index(end)])
    total = torch.zeros(model.cfg.n_layers, model.cfg.d_model, dtype=torch.float64)
    for _, acts in final_token_activations(model, seqs, batch_size=batch_size, hook=HOOK):
        total += acts.double().sum(0)
    return total / len(seqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished reproduction directory (config.json, resid/, ...)")
    ap.add_argument("--layers", default=None, help="comma-separated layers H of h (default: the refusal layer)")
    ap.add_argument("--end-token", default="<|im_end|>", help="the token that closes the user's turn")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    cfg = json.loads((run / "config.json").read_text())
    layer = json.loads((run / "direction.json").read_text())["layer"]
    harm_layers = [layer] if args.layers is None else [int(x) for x in args.layers.split(",")]
    base = Condition.parse(f"direction:{layer}")
    base_key = base.key
    keys = [base_key] + [f"{base_key}+harm:{h}" for h in harm_layers]
    rows = load_dataset(DATASET)
    out.mkdir(parents=True, exist_ok=True)
    path, dirs_path = out / "completions.jsonl", out / "harm_directions.safetensors"
    done = read_done(path)

    model = cna_lens.load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    iv = interventions(run, model, cfg["seed"])
    if not 0 <= min(harm_layers) <= max(harm_layers) < model.cfg.n_layers:
        raise SystemExit(f"--layers {harm_layers}: the model has layers 0..{model.cfg.n_layers - 1}")
    if dirs_path.exists():
        harm = load_file(str(dirs_path))["harm"]
    else:
        pos, neg = (load_prompts(name) for name in cfg["discovery"])
        harm = (instruction_means(model, pos, args.end_token) - instruction_means(model, neg, args.end_token)).float()
        save_file({"harm": harm}, str(dirs_path))
    r = iv.direction(base).flatten()  # one unit vector: the run's direction is one layer's

    def perp(h: torch.Tensor) -> torch.Tensor:
        h = h - (h @ r) * r
        return h / h.norm()

    extra = {base_key: []} | {k: [perp(harm[h])] for k, h in zip(keys[1:], harm_layers)}
    harmless = load_prompts(cfg["kl_dataset"], cfg["kl_limit"])
    reference = final_logprobs(model, harmless)
    kl: dict[str, float] = {}
    for key in keys:
        with ExitStack() as stack:
            stack.enter_context(iv.edit(base)())
            for h in extra[key]:
                stack.enter_context(cna_lens.edit_direction(model, h))
            kl[key] = kl_divergence(reference, final_logprobs(model, harmless)).mean().item()
            todo = [x for x in rows if (key, x["id"]) not in done]

            def save(_job: int, i: int, text: str, key: str = key, todo: list = todo) -> None:
                x = todo[i]
                row = {"model": cfg["model"], "dataset": DATASET, "condition": key, "prompt_id": x["id"]}
                row |= {"prompt": x["prompt"], "completion": text}
                append_jsonl(path, [row])
                done[key, x["id"]] = row

            if todo:
                generate_many(
                    model,
                    [(None, [x["prompt"] for x in todo])],
                    max_new_tokens=cfg["max_new_tokens"],
                    batch_size=args.batch_size,
                    on_done=save,
                )

    ran = {
        x["prompt_id"]: x["completion"]
        for x in map(json.loads, open(run / "completions.jsonl"))
        if x["dataset"] == DATASET and x["condition"] == base_key
    }
    answers = [done[k, x["id"]] for k in keys for x in rows]
    hand = hand_labels(answers)
    read = {(x["model"], x["condition"], x["prompt_id"]): x["label"] for x in heldout_rows()}
    report = report_head("cna_lens.HarmfulnessDirection", run, cfg, len(rows)) | {
        "refusal_layer": layer,
        "kl_prompts": f"{cfg['kl_dataset']}[:{cfg['kl_limit']}]",
        "cos_harm_refusal": [float(torch.cosine_similarity(h, r, dim=0)) for h in harm],
        "cos_harm_refusal_same_layer": [
            float(torch.cosine_similarity(h, iv.resid.diff[i].float(), dim=0)) for i, h in enumerate(harm)
        ],
        "same_as_run": sum(done[base_key, x["id"]]["completion"] == ran.get(x["id"]) for x in rows),
        "conditions": {},
    }
    prompts = [x["prompt"] for x in rows]
    for key in keys:
        texts = [done[key, x["id"]]["completion"] for x in rows]
        judged = [v.label for v in judge_completions(prompts, texts, JUDGE)]
        entry: dict = {"kl": kl[key], JUDGE: label_rates(judged)}  # the same form as the hand labels
        if key in hand:
            entry["hand"] = hand[key]
        report["conditions"][key] = entry
    if all(k in hand for k in keys[:2]):  # the refusal direction alone against the first harmfulness layer
        a, b = (hand[k]["labelled_as"] for k in keys[:2])
        b01, b10, p = mcnemar(*([read[cfg["model"], n, x["id"]] == "comply" for x in rows] for n in (a, b)))
        report["hand_mcnemar_comply"] = {"conditions": keys[:2], "second_only": b01, "first_only": b10, "p": p}
    atomic_write_json(out / "harmfulness.json", report)
    print(f"refusal direction alone: {report['same_as_run']} of {len(rows)} answers as in the run")
    for key, e in report["conditions"].items():
        print(f"{key:>22}: KL {e['kl']:.3f}, classifier comply {e[JUDGE]['comply']['rate']:.2f}")


if __name__ == "__main__":
    main()
