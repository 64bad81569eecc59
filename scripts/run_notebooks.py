"""Execute the notebooks on a real model and save them with their outputs (what GitHub shows).

    python scripts/run_notebooks.py --runs runs/notebooks [--only 01_quickstart.ipynb]

The first code cell of each notebook is replaced by the REAL parameters below; figures are saved
both as interactive plotly JSON and as PNG (needs kaleido + Chromium). Discovery results under
``--runs`` are reused (seed it with a saved attribution to skip the 202-prompt pass).
"""

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
REAL = {
    "01_quickstart.ipynb": 'MODEL = "qwen2.5-coder-1.5b-instruct"\nDTYPE = "float32"\n'
    'FRACTION = 0.003\nN_EVAL = 6\nMAX_NEW_TOKENS = 48\nJUDGE = "default"',
    "02_circuit_maps.ipynb": 'MODEL = "qwen2.5-coder-1.5b-instruct"\nDTYPE = "float32"\n'
    "FRACTION = 0.001\nN_EVAL = 8\nTOP_N = 50",
    "03_base_vs_instruct.ipynb": 'MODEL_A = "qwen2.5-coder-0.5b-instruct"\nDTYPE = "float32"\n'
    "MODEL_B = None\nPERTURB = 0.5\nFRACTION = 0.001\nN_EVAL = 8\n"
    'CROSS_SIZE = ["results/reproduce-qwen2.5-coder-1.5b-instruct/attribution", '
    '"results/reproduce-qwen2.5-coder-0.5b-instruct/attribution"]',
    "04_selection_search.ipynb": 'MODEL = "qwen2.5-coder-1.5b-instruct"\nDTYPE = "auto"\n'
    'SEARCH = "results/search-qwen2.5-coder-1.5b-instruct-judge"\n'
    'TRIALS = 12\nN_SEARCH = 12\nN_DISCOVERY = None\nCONFIRM = 3\nN_EVAL = 4\nMAX_NEW_TOKENS = 64\nJUDGE = "default"',
}

p = argparse.ArgumentParser()
p.add_argument("--runs", default="runs/notebooks")
p.add_argument("--only", nargs="*", default=sorted(REAL))
args = p.parse_args()
os.environ.update(
    CNA_LENS_RUNS=str(Path(args.runs).resolve()), HF_HUB_OFFLINE="1", CNA_LENS_RENDERER="plotly_mimetype+png"
)
for name in args.only:
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    next(c for c in nb.cells if c.cell_type == "code").source = REAL[name]
    t0 = time.time()
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nb.metadata["cna_lens_run"] = {"wall_s": round(time.time() - t0), "params": REAL[name]}
    nbformat.write(nb, path)
    print(f"{name}: {time.time() - t0:.0f} s")
