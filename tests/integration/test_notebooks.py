"""The notebooks run top to bottom on the packaged SmolLM2 (outputs are not saved).

Each notebook reuses a discovery saved under its runs directory (``cached_attribution``). The tests seed
that directory with attributions on a few prompts, computed once, so that the notebooks skip four
202-prompt discovery passes and run everything else: selection, figures, generation, judging, export,
circuit maps, the base/instruct comparison (model B's discovery is seeded from other prompts than A's,
so that the two differ), and a small search, which runs its own discovery.
"""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import cna_lens
from cna_lens.datasets import load_prompts

from .conftest import ALIAS, needs_smollm2

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "01_quickstart.ipynb": f'MODEL = "{ALIAS}"\nDTYPE = "auto"\n'
    'FRACTION = 0.001\nN_EVAL = 2\nMAX_NEW_TOKENS = 8\nJUDGE = "regex"',  # regex: no encoder load
    "02_circuit_maps.ipynb": f'MODEL = "{ALIAS}"\nDTYPE = "auto"\nFRACTION = 0.0005\nN_EVAL = 3\nTOP_N = 3',
    "03_base_vs_instruct.ipynb": f'MODEL_A = "{ALIAS}"\nDTYPE = "auto"\n'
    "MODEL_B = None\nPERTURB = 0.5\nFRACTION = 0.001\nN_EVAL = 3\n"
    'CROSS_SIZE = ["results/foundation-qwen2.5-coder-1.5b-instruct/attribution", '
    '"results/reproduce-qwen2.5-coder-0.5b-instruct/attribution"]',
    "04_selection_search.ipynb": f'MODEL = "{ALIAS}"\nDTYPE = "auto"\nSEARCH = None\n'
    'TRIALS = 3\nN_SEARCH = 4\nN_DISCOVERY = 24\nCONFIRM = 2\nN_EVAL = 2\nMAX_NEW_TOKENS = 8\nJUDGE = "regex"',
}
#: What each notebook leaves behind: files under its runs directory, and text in its outputs.
EVIDENCE = {
    "01_quickstart.ipynb": (
        ["edited/cna_lens_edit.json", "edited/model.safetensors"],
        ["refusals: baseline", "max |hooked - edited|"],
    ),
    "02_circuit_maps.ipynb": ([f"{ALIAS}/layer_map", f"{ALIAS}/neuron_effects.json"], ["baseline mean refusal"]),
    "03_base_vs_instruct.ipynb": ([], ["Jaccard of top-k", "A set in B: refusal log-odds"]),
    "04_selection_search.ipynb": (
        [f"{ALIAS}/search/pareto.json", f"{ALIAS}/search/confirm.json", f"{ALIAS}/search/selection.json"],
        ["re-measured on fresh prompts", "; search: ", "judged comply: baseline"],
    ),
}
#: The names under which the notebooks look for a saved discovery of the model (``cached_attribution``),
#: and that of notebook 03's model B (A with perturbed MLP weights, ``PERTURB = 0.5``).
ATTRIBUTION_NAMES = (ALIAS, "A-" + ALIAS)
B_NAME = f"B-{ALIAS}-perturbed-0.5"

pytestmark = [pytest.mark.integration, needs_smollm2]


@pytest.fixture(scope="module")
def seeded_runs(smol, tmp_path_factory):
    """A runs directory holding a discovery on 12 + 12 prompts under every name the notebooks use, and
    one on the next 12 + 12 as model B's."""
    runs = tmp_path_factory.mktemp("seed")
    harmful, harmless = load_prompts("discovery_harmful", limit=24), load_prompts("discovery_harmless", limit=24)
    attr = cna_lens.attribute(smol, harmful[:12], harmless[:12], batch_size=12, progress=False)
    for name in ATTRIBUTION_NAMES:
        attr.save(runs / name / "attribution")
    cna_lens.attribute(smol, harmful[12:], harmless[12:], batch_size=12, progress=False).save(
        runs / B_NAME / "attribution"
    )
    return runs


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_executes(name, seeded_runs, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(seeded_runs, runs)
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    first_code.source = PARAMS[name]
    monkeypatch.setenv("CNA_LENS_RUNS", str(runs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scratch = tmp_path / "tmpdir"  # the kernel's temporary directory: a notebook must clean up after itself
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert not list(scratch.iterdir()), "the notebook left files in the temporary directory"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    seeded = sorted(p.relative_to(seeded_runs) for p in seeded_runs.glob("*/attribution"))
    assert sorted(p.relative_to(runs) for p in runs.glob("*/attribution")) == seeded  # no discovery of its own
    files, texts = EVIDENCE[name]
    for f in files:
        assert (runs / f).exists(), f  # the notebook saved its results
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for t in texts:
        assert t in text, t
