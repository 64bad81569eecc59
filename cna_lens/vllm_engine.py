"""Generation on vLLM (optional ``vllm`` extra, CUDA only): the path for users who outgrow one machine.

An edit is carried by the weights, so vLLM needs nothing of cna_lens: export the edited model
(``cna-lens export``, a plain Hugging Face directory) and generate from that directory, with
tensor parallelism over ``tensor_parallel_size`` GPUs. Decoding is greedy (``temperature=0``),
prompts go through the tokenizer's chat template like everywhere else in cna_lens
(:func:`cna_lens.prompts.encode`), and the texts come back in prompt order.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path


def check_vllm(model_dir: str | os.PathLike, tensor_parallel_size: int = 1) -> Path:
    """Fail early, before any import of vLLM's engine, when this cannot run here."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--engine vllm needs a Hugging Face model directory (e.g. written by `cna-lens export`); "
            f"{path} has no config.json"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs the vllm package: pip install 'cna-lens[vllm]' (CUDA machines)")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--engine vllm runs on CUDA GPUs; none is visible here (use the default engine on CPU)")
    if not 1 <= tensor_parallel_size <= torch.cuda.device_count():
        raise ValueError(f"--tensor-parallel {tensor_parallel_size}: {torch.cuda.device_count()} GPU(s) are visible")
    return path


def generate_vllm(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    tensor_parallel_size: int = 1,
    chat: bool | None = None,
    system: str | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` by the model in ``model_dir`` on vLLM, in prompt order."""
    path = check_vllm(model_dir, tensor_parallel_size)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from .prompts import encode

    tok = AutoTokenizer.from_pretrained(path)
    seqs = encode(tok, list(prompts), chat=chat, system=system)
    llm = LLM(model=str(path), tensor_parallel_size=tensor_parallel_size, dtype="auto")
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params)
    return [o.outputs[0].text for o in outs]
