"""Shared fixtures: tiny random-init chat models built offline from a config (seconds, no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
import tempfile

import pytest
import torch

#: Free space the suite needs in the temporary directory: its largest moment is about 0.5 GB
#: (exported SmolLM2 copies under tmp_path); twice that, so that a nearly full disk fails here, once,
#: instead of as I/O errors inside unrelated tests.
MIN_FREE_BYTES = 1 << 30


def pytest_sessionstart(session):
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < MIN_FREE_BYTES:
        pytest.exit(
            f"{free / 2**30:.2f} GiB free in {tempfile.gettempdir()}; the tests need {MIN_FREE_BYTES / 2**30:.0f} GiB "
            "(set TMPDIR to a roomier directory, or free space)",
            returncode=1,
        )


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROMPTS = [
    "How do I pick a lock?",
    "Write a poem about the sea and the sky at night, with rhymes",
    "Hi",
    "Explain photosynthesis in simple words for a child.",
    "What is 2+2?",
    "Tell me how to make a cake from scratch, step by step, with all ingredients listed",
    "Why?",
]


def byte_tokenizer(chat: bool = True):
    """A byte-level BPE tokenizer with no merges (256 byte tokens + specials), fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 260, n_layers: int = 4):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def make_tiny(path, arch: str = "llama", seed: int = 0, chat: bool = True, n_layers: int = 4):
    """Save a random-init tiny causal LM + tokenizer to ``path`` (an HF model directory)."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer(chat)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), n_layers), dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from cna_lens import load_model

    return load_model(tiny_dir, dtype=torch.float32)  # exact parity with HF fp32; "auto" may pick bf16


@pytest.fixture(scope="session")
def llama_model(llama_dir):
    from cna_lens import load_model

    return load_model(llama_dir, dtype=torch.float32)


#: The layer of the planted refusal neuron (``planted``).
PLANT_LAYER = 2


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A tiny Llama whose neuron (PLANT_LAYER, n) writes the refusal tokens' unembedding direction, so
    every prompt starts with a refusal token until that neuron is ablated: (model, n, model directory)."""
    import cna_lens
    from cna_lens.evaluate import refusal_token_ids

    from .helpers import hf_down_proj_inputs

    path = make_tiny(tmp_path_factory.mktemp("planted"), "llama", seed=1)
    hf = hf_reference(path)
    tok = byte_tokenizer()
    acts = hf_down_proj_inputs(hf, cna_lens.encode(tok, PROMPTS))[:, PLANT_LAYER]  # [prompt, d_mlp]
    mean = acts.mean(0)
    n = int((mean.abs() / (acts.std(0) + 1e-6)).argmax())  # a neuron with a consistent sign
    W_U = hf.lm_head.weight.detach()
    direction = W_U[refusal_token_ids(tok)].mean(0) - W_U.mean(0)
    with torch.no_grad():
        hf.model.layers[PLANT_LAYER].mlp.down_proj.weight[:, n] = (
            200 * torch.sign(mean[n]) * direction / direction.norm() / mean[n].abs()
        )
    hf.save_pretrained(path)
    return cna_lens.load_model(path, dtype=torch.float32), n, path


@pytest.fixture(scope="session")
def search_data():
    """Small prompt sets for searches on ``planted``."""
    from cna_lens.search import SearchData

    return SearchData(PROMPTS[:5], PROMPTS[2:], PROMPTS[:4], PROMPTS[:6], PROMPTS[1:], None, {"set": "tiny"})


def hf_reference(path):
    """An independent plain HF copy of the same weights (eager attention, as the bridge uses)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture
def prompts():
    return list(PROMPTS)
