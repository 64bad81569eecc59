"""Write a Llama- or Qwen2-architecture checkpoint as one GGUF file (f16, bf16 or q8_0).

Uses the ``gguf`` package (llama.cpp's own Python writer, quantizers and tensor-name map) rather
than a hand-written format. What the file holds:

- architecture metadata (``llama.*`` / ``qwen2.*``: context, widths, heads, RMS eps, RoPE base);
- every tensor under the name ``gguf.TensorNameMap`` gives it; 1-D tensors (norms, biases) in F32,
  matrices in the chosen type (q8_0 needs rows divisible by 32, else that matrix stays f16);
  Llama's ``q_proj`` / ``k_proj`` rows are reordered from Hugging Face's half-split RoPE layout to
  llama.cpp's interleaved one (Qwen2 uses the half-split layout natively);
- the tokenizer (byte-level BPE: ``tokenizer.ggml.model = gpt2``, tokens, types, merges, special
  ids, ``add_bos``) and the chat template.

Not covered (``NotImplementedError``): other architectures, RoPE scaling (Llama 3.1 style, YaRN),
sliding-window attention, SentencePiece tokenizers. ``tokenizer.ggml.pre`` (llama.cpp's
pre-tokenizer regex) is recognised for SmolLM/SmolLM2, Qwen2 and Llama 3 vocabularies, else
``"default"`` unless given. The tests check the file with ``gguf.GGUFReader`` and by loading it
back through transformers' GGUF loader; running it in llama.cpp itself is not tested here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "bf16", "q8_0")


def _arch(model_type: str) -> Any:
    import gguf

    arches = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    if model_type not in arches:
        raise NotImplementedError(
            f"GGUF export supports the llama and qwen2 architectures, not {model_type!r}; export format='hf' "
            "and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return arches[model_type]


def check_config(config: dict[str, Any]) -> None:
    """Refuse what the writer does not translate (before any tensor is written)."""
    _arch(config.get("model_type", "?"))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise NotImplementedError(f"GGUF export does not translate RoPE scaling ({kind!r}); use format='hf'")
    if config.get("use_sliding_window"):
        raise NotImplementedError("GGUF export does not translate sliding-window attention; use format='hf'")


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def interleave_rope(w: Tensor, n_head: int) -> Tensor:
    """Rows of a q/k projection from the half-split RoPE layout (HF) to adjacent pairs (llama.cpp).

    Within each head, row ``j`` of the first half and row ``j`` of the second half rotate together;
    llama.cpp's ``llama`` RoPE rotates rows ``2j`` and ``2j+1``.
    """
    head = w.shape[0] // n_head
    return w.reshape(n_head, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def guess_pre(model_type: str, vocab: dict[str, int]) -> str:
    """llama.cpp's pre-tokenizer name for the vocabularies cna_lens is used with."""
    if model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab and len(vocab) >= 128000:
        return "llama-bpe"
    if "<|im_start|>" in vocab and len(vocab) == 49152:
        return "smollm"
    log.warning("unknown BPE pre-tokenizer: writing tokenizer.ggml.pre='default' (pass gguf_pre= to choose)")
    return "default"


def _tokenizer(writer: Any, tokenizer: Any, tokenizer_dir: Path, n_vocab: int, model_type: str, pre: str | None):
    import gguf

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotImplementedError("GGUF export supports byte-level BPE tokenizers (GPT-2 family) only")
    vocab = tokenizer.get_vocab()
    added = tokenizer.added_tokens_decoder
    by_id = {i: tok for tok, i in vocab.items()}
    beyond = sorted(tok for i, tok in by_id.items() if i >= n_vocab)
    if beyond:  # no embedding row: the model cannot read or write them
        log.warning("dropping %d tokenizer tokens past the model's vocab_size %d: %s", len(beyond), n_vocab, beyond[:5])
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows past the tokenizer (Qwen2 pads its vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or guess_pre(model_type, vocab))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def _encode(t: Tensor, qtype: str) -> tuple[np.ndarray, Any]:
    """``(array, raw_dtype)`` for ``GGUFWriter.add_tensor``."""
    import gguf

    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if a.ndim == 1:
        return a, None
    if qtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if qtype == "bf16":
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return a.astype(np.float16), None


def write_gguf(
    path: Path,
    config: dict[str, Any],
    state: dict[str, Tensor],
    tokenizer: Any,
    tokenizer_dir: Path,
    gguf_type: str = "f16",
    *,
    name: str = "model",
    pre: str | None = None,
) -> Path:
    """Write ``state`` (Hugging Face names) with ``config`` and the tokenizer as one GGUF file."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    check_config(config)
    model_type = config["model_type"]
    arch = _arch(model_type)
    n_layers, n_head = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    d_model = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or d_model // n_head)

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != d_model // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    ftype = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[gguf_type]
    writer.add_file_type(gguf.LlamaFileType[ftype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, tokenizer, tokenizer_dir, int(config["vocab_size"]), model_type, pre)

    names = gguf.TensorNameMap(arch, n_layers)
    tied = bool(config.get("tie_word_embeddings"))
    for key, t in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF tensor name for {key!r} in the {model_type} architecture")
        if model_type == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = interleave_rope(t, n_head)
        elif model_type == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = interleave_rope(t, n_kv)
        data, raw = _encode(t, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
