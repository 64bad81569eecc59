"""Which ranking finds the neurons to scale? Searches restricted to one ranking, under several seeds,
compared with the reference methods at equal KL on fresh prompts.

A study is ``cna-lens search ... --rankings R --seed S --trials N --trial-batch K --confirm C --confirm-front``
in ``WORK/R-sS``. What a search computes from the model and the prompts alone, whatever its ranking or
seed, is copied from ``--source`` (a finished search of the same model on the bundled prompts, run with
``--confirm C --confirm-front``): the discovery, CAA and residual statistics, the pruning effects, and
the fresh-prompt baseline and reference curves. These are the search's own resume files, so a study
measures its validation baseline and reference curves (on the engine that scores its trials; the
source's may have been scored on another), its trials, its candidates and its front. A stopped run
resumes: a finished study is read back, a partial one continues where it stopped.

Then ``benchmarks/equal_kl.py`` compares the source and the studies on the fresh prompts: for each
reference point, each study's best point with no more KL and the exact McNemar test between them.

python benchmarks/ranking_studies.py --source results/search-qwen2.5-coder-1.5b-instruct-judge \\
    --studies contrast_minus_utility:0 contrast_minus_utility:1 t:0 t:1 abs:0 diff:0 effect:0 \\
    --work runs/ranking-studies --out benchmarks/results/ranking-studies/qwen2.5-coder-1.5b-instruct-judge
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cna_lens.confirm import ConfirmData
from cna_lens.datasets import SearchData
from cna_lens.pareto import load_result
from cna_lens.runs import atomic_write_json, read_json
from cna_lens.search_refs import CAA_ALPHAS, REFERENCE_FRACTIONS
from cna_lens.selection import RANKINGS

SHARED = ("attribution", "caa", "resid", "effects.safetensors")


def parse_study(spec: str) -> tuple[str, int]:
    ranking, _, seed = spec.partition(":")
    if ranking not in RANKINGS or not seed.isdigit():
        raise SystemExit(f"study {spec!r}: expected RANKING:SEED with RANKING one of {', '.join(RANKINGS)}")
    return ranking, int(seed)


def check_source(src: Path, references: bool = True) -> tuple[dict, dict, dict]:
    """The source's config, result and confirmation, after checking that its shared files are those a study would
    compute: the bundled prompts, the default reference curves, and (``references``) fresh-prompt references."""
    missing = [f for f in (*SHARED, "config.json", "confirm.json", "pareto.json") if not (src / f).exists()]
    if missing:
        raise SystemExit(f"{src}: missing {', '.join(missing)} (a finished search with --confirm K --confirm-front)")
    cfg, res = json.loads((src / "config.json").read_text()), load_result(src)
    conf = read_json(src / "confirm.json", "cna_lens.SearchConfirmation")
    data, fresh = SearchData.bundled(), ConfirmData.bundled(quality=None)  # confirm.json names no quality set
    expected = {
        "data": data.names | {"digest": data.digest()},
        "reference_fractions": list(REFERENCE_FRACTIONS),
        "caa_alphas": list(CAA_ALPHAS),
        "startup_trials": 10,
    }
    for key, want in expected.items():
        if cfg.get(key) != want:
            raise SystemExit(f"{src}: {key} is {cfg.get(key)}, a study would use {want}")
    if conf["data"] != fresh.names | {"digest": fresh.digest()}:
        raise SystemExit(f"{src}: confirm.json holds measurements on {conf['data']}, not the default fresh prompts")
    if references and not conf.get("references"):
        raise SystemExit(f"{src}: confirm.json holds no reference curves (a search run with --confirm-front)")
    return cfg, res, conf


def seed_study(src: Path, conf: dict, out: Path) -> None:
    """Copy the source's shared files and its confirmation ``conf`` into a new study directory (the
    fresh-prompt measurements of its own trials left out)."""
    out.mkdir(parents=True)
    for f in SHARED:
        (shutil.copytree if (src / f).is_dir() else shutil.copy2)(src / f, out / f)
    atomic_write_json(out / "confirm.json", {**conf, "trials": {}})


def command(
    cfg: dict,
    res: dict,
    out: Path,
    *,
    rankings: str,
    seed: int,
    trials: int,
    trial_batch: int,
    confirm: int,
    front: bool = True,
) -> list[str]:
    """``cna-lens search`` with the source's model, objective, judge and rule, into ``out``, with
    ``--confirm CONFIRM`` (and ``--confirm-front``) and no samples or PNG."""
    cmd = [sys.executable, "-m", "cna_lens.cli", "search", "--model", cfg["model"], "--dtype", cfg["dtype"]]
    cmd += ["--objective", cfg["objective"], "--batch-size", str(cfg["batch_size"])]
    if cfg["objective"] == "judge":
        cmd += ["--judge", cfg["judge"], "--max-new-tokens", str(cfg["max_new_tokens"])]
        cmd += ["--generation-batch-size", str(cfg["generation_batch_size"]), "--trial-batch", str(trial_batch)]
    rule = res["rule"]
    cmd += ["--kl-cap", str(rule["kl_cap"]), "--over-refusal-slack", str(rule["over_refusal_slack"])]
    cmd += ["--trials", str(trials), "--rankings", rankings, "--seed", str(seed)]
    cmd += ["--confirm", str(confirm), *(["--confirm-front"] if front else [])]
    cmd += ["--samples", "0", "--no-png", "--out", str(out)]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True, help="finished search with --confirm K --confirm-front")
    p.add_argument("--studies", nargs="+", required=True, help="RANKING:SEED ...")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--trial-batch", type=int, default=4, help="judged objective only")
    p.add_argument("--confirm", type=int, default=8)
    p.add_argument("--work", type=Path, required=True, help="the studies' directories: WORK/RANKING-sSEED")
    p.add_argument("--out", type=Path, required=True, help="output stem of the equal-KL comparison")
    args = p.parse_args()
    studies = [parse_study(s) for s in args.studies]
    if len(set(studies)) != len(studies):
        raise SystemExit("a study is listed twice")
    if args.trials < 1 or args.trial_batch < 1 or args.confirm < 1:
        raise SystemExit("--trials, --trial-batch and --confirm must be >= 1")
    cfg, res, conf = check_source(args.source)
    if args.trial_batch > 1 and cfg["objective"] != "judge":
        raise SystemExit("--trial-batch > 1 needs a search with the judged objective")
    searched = cfg["space"]["rankings"]
    searched = "all rankings" if set(searched) == set(RANKINGS) else ", ".join(searched)
    dirs, labels = [args.source], [f"{searched}, seed {cfg['seed']} ({res['n_trials']} trials)"]
    for ranking, seed in studies:
        out = args.work / f"{ranking}-s{seed}"
        if not (out / "config.json").exists():
            if out.exists():
                shutil.rmtree(out)  # seeded but never started: seed it again
            seed_study(args.source, conf, out)
        start = time.perf_counter()
        print(f"study {ranking}, seed {seed} -> {out}", flush=True)
        kw = dict(rankings=ranking, seed=seed, trials=args.trials, trial_batch=args.trial_batch, confirm=args.confirm)
        subprocess.run(command(cfg, res, out, **kw), check=True)
        print(f"study {ranking}, seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        dirs.append(out)
        labels.append(f"{ranking}, seed {seed}")
    compare = [sys.executable, str(Path(__file__).with_name("equal_kl.py")), "--searches", *map(str, dirs)]
    subprocess.run([*compare, "--labels", *labels, "--out", str(args.out)], check=True)


if __name__ == "__main__":
    main()
