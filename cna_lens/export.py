"""Export an edited model: a Hugging Face directory any engine loads, or a GGUF file for llama.cpp.

``export_model(model, out, neurons=..., scale=0)`` applies the weight edits of
:mod:`cna_lens.edit` and writes, inside them, the model that the hooked model computes:

- ``format="hf"``: ``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer
  with its chat template, and ``cna_lens_edit.json`` (what was edited, from which model, by which
  version). Plain ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it; nothing of
  cna_lens is needed.
- ``format="gguf"``: ``model-<type>.gguf`` (f16 / bf16 / q8_0, :mod:`cna_lens.gguf_export`) and
  ``cna_lens_edit.json``.

CAA vectors need a ``down_proj`` bias. Where the checkpoint has none, the export switches on the
architecture's ``mlp_bias`` config flag (Llama / SmolLM2) and writes zero ``gate_proj`` /
``up_proj`` biases and ``down_proj`` bias ``−alpha·v_l``; architectures without such a flag
(Qwen2, Gemma3) raise ``NotImplementedError``: steer them with hooks (``cna_lens.steer``).

The directory appears whole or not at all: everything is written to a temporary sibling that
is renamed into place.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .edit import (
    check_neurons,
    check_strength,
    edit_direction,
    edit_weights,
    hf_model,
    steering_biases,
    unit_directions,
)
from .gguf_export import GGUF_TYPES, check_config, write_gguf
from .models import HookedModel, model_name, weights_processed
from .neurons import NeuronSet
from .runs import atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMATS = ("hf", "gguf")
EDIT_FILE = "cna_lens_edit.json"


def check_export_args(
    out_dir: str | os.PathLike,
    *,
    scale: float = 0.0,
    alpha: float = 1.0,
    format: str = "hf",
    gguf_type: str = "f16",
    force: bool = False,
) -> Path:
    """The checks that need no model (run them before loading one); returns the output path."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    for name, value in (("scale", scale), ("alpha", alpha)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")
    out = Path(out_dir)
    if out.exists() and not (force and out.is_dir()):
        what = "a file" if not out.is_dir() else "there"
        raise ValueError(f"{out} already exists ({what}); choose another output directory or pass force=True / --force")
    return out


def export_config(hf: Any, mlp_bias: bool = False) -> dict[str, Any]:
    """The model's config as a dict, as a fresh checkpoint should carry it."""
    config = hf.config.to_dict()
    config["output_attentions"] = False  # TransformerLens switches it on for its attention hooks
    if mlp_bias and not _has_down_bias(hf):
        if "mlp_bias" not in config:
            raise NotImplementedError(
                f"{config.get('model_type')!r} checkpoints have no down_proj bias and no mlp_bias option: CAA "
                "vectors cannot be exported as weights; steer with hooks (cna_lens.steer)"
            )
        config["mlp_bias"] = True
    return config


def _has_down_bias(hf: Any) -> bool:
    from .edit import down_proj

    return down_proj(hf, 0).bias is not None


def _reference(hf: Any, config: dict[str, Any]) -> Any:
    """A parameter-free (meta-device) instance of the model's class: it names the checkpoint's tensors."""
    cfg = type(hf.config).from_dict(config)
    with torch.device("meta"):
        return type(hf)(cfg)


def _resolve(hf: Any, key: str) -> Tensor | None:
    """``hf.model.layers.0.mlp.down_proj.weight`` by public attribute access (works through bridge wrappers)."""
    try:
        return functools.reduce(getattr, key.split("."), hf)
    except AttributeError:
        return None


def _layer_of(key: str) -> int:
    return int(key.split(".layers.")[1].split(".")[0])


def state_dict(hf: Any, ref: Any, biases: dict[int, Tensor]) -> dict[str, Tensor]:
    """The tensors of a checkpoint with ``ref``'s names, read from the live (edited) model.

    ``biases``: ``{layer: increment}`` added to ``down_proj.bias`` (a zero bias where the model has
    none; the other MLP biases that ``mlp_bias`` adds are written as zeros).
    """
    out: dict[str, Tensor] = {}
    expected = ref.state_dict()
    for key, meta in expected.items():
        t = _resolve(hf, key)
        if key.endswith(".bias") and ".mlp." in key:
            weight = _resolve(hf, key.removesuffix("bias") + "weight")
            base = t if t is not None else torch.zeros(meta.shape, dtype=weight.dtype, device=weight.device)
            add = biases.get(_layer_of(key)) if key.endswith("down_proj.bias") else None
            t = base if add is None else base + add.to(base.device, base.dtype)
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"cannot export {key}: the model has {None if t is None else tuple(t.shape)}")
        out[key] = t.detach()
    lm_head = hf.get_output_embeddings()
    extra = getattr(lm_head, "bias", None)
    if isinstance(extra, Tensor) and "lm_head.bias" not in expected and bool(extra.ne(0).any()):
        raise ValueError("the unembedding has a non-zero bias that this architecture's checkpoint cannot hold")
    return out


def edit_record(
    model: HookedModel,
    hf: Any,
    *,
    neurons: NeuronSet | None,
    scale: float,
    vectors: Tensor | None,
    alpha: float,
    layers: list[int] | None,
    direction: Tensor | None,
    strength: float,
    provenance: dict | None,
    format: str,
    gguf_type: str | None,
) -> dict[str, Any]:
    """The content of ``cna_lens_edit.json``."""
    from . import __version__

    edits: list[dict[str, Any]] = []
    if neurons is not None:
        edits.append(
            {
                "kind": "neurons",
                "hook": neurons.hook,
                "scale": float(scale),
                "count": len(neurons),
                "layers": list(neurons.layers),
                "indices": list(neurons.indices),
                "selection": neurons.meta,
                "weights": "model.layers[l].mlp.down_proj.weight[:, i] *= scale",
            }
        )
    if vectors is not None:
        edits.append(
            {
                "kind": "steering",
                "hook": "hook_mlp_out",
                "alpha": float(alpha),
                "layers": list(range(vectors.shape[0])) if layers is None else [int(x) for x in layers],
                "vectors": vectors.detach().float().tolist(),
                "weights": "model.layers[l].mlp.down_proj.bias += -alpha * vectors[l]",
            }
        )
    if direction is not None:
        edits.append(
            {
                "kind": "direction",
                "direction": direction.detach().float().tolist(),
                "strength": float(strength),
                "weights": "W -= s r r^T W on embed_tokens rows, self_attn.o_proj, mlp.down_proj (r = unit direction)",
            }
        )
    return {
        "kind": "cna_lens.Edit",
        "format_version": FORMAT_VERSION,
        "cna_lens_version": __version__,
        "source_model": model_name(model) if hasattr(model, "cfg") else str(hf.name_or_path),
        "source_path": str(hf.name_or_path),
        "architecture": type(hf).__name__,
        "dtype": str(next(hf.parameters()).dtype).removeprefix("torch."),
        "format": format,
        "gguf_type": gguf_type if format == "gguf" else None,
        "edits": edits,
        "provenance": dict(provenance or {}),
    }


def _readable(directory: Path) -> None:
    """Give the export the permissions of a normal directory under the user's umask."""
    from .runs import _umask

    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def export_model(
    model: HookedModel,
    out_dir: str | os.PathLike,
    *,
    neurons: NeuronSet | None = None,
    scale: float = 0.0,
    vectors: Float[Tensor, "layer d_model"] | None = None,
    alpha: float = 1.0,
    layers: list[int] | None = None,
    direction: Float[Tensor, "*layer d_model"] | None = None,
    direction_strength: float = 1.0,
    tokenizer: Any = None,
    provenance: dict | None = None,
    format: str = "hf",
    gguf_type: str = "f16",
    gguf_pre: str | None = None,
    force: bool = False,
) -> Path:
    """Write the model with ``neurons`` scaled by ``scale``, CAA ``vectors`` added (``−alpha·v_l`` at
    ``hook_mlp_out``) and/or ``direction`` ablated (at ``direction_strength``, :func:`cna_lens.edit_direction`),
    as ``out_dir`` (see the module docstring).

    ``model``: a bridge from :func:`cna_lens.load_model` (unprocessed weights) or a Hugging Face
    ``PreTrainedModel`` (then pass ``tokenizer``). The weights are written in the model's dtype
    (q8_0 / f16 / bf16 for GGUF). ``provenance``: extra JSON-able facts to record (e.g. the run
    directory the neurons came from). ``force``: replace an existing ``out_dir``.
    """
    out = check_export_args(out_dir, scale=scale, alpha=alpha, format=format, gguf_type=gguf_type, force=force)
    hf = hf_model(model)
    if weights_processed(model):
        raise ValueError("export needs the model loaded with process_weights=False (the default)")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= (the model has none attached)")
    if neurons is not None:
        check_neurons(hf, neurons)
    if vectors is not None and direction is not None:
        raise ValueError("export CAA vectors and a direction separately: their order of application is ambiguous")
    biases = steering_biases(model, vectors, alpha, layers) if vectors is not None else {}
    if direction is not None:
        from .edit import model_shape

        unit_directions(direction, *model_shape(hf)[:2])  # validate before any work
        check_strength(direction_strength)
    config = export_config(hf, mlp_bias=bool(biases))
    if format == "gguf":
        check_config(config)
    record = edit_record(
        model,
        hf,
        neurons=neurons,
        scale=scale,
        vectors=vectors,
        alpha=alpha,
        layers=layers,
        direction=direction,
        strength=direction_strength,
        provenance=provenance,
        format=format,
        gguf_type=gguf_type,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        with ExitStack() as stack:
            if neurons is not None:
                stack.enter_context(edit_weights(model, neurons, scale))
            if direction is not None:
                stack.enter_context(edit_direction(model, direction, direction_strength))
            ref = _reference(hf, config)
            tensors = state_dict(hf, ref, biases)
            if format == "hf":
                ref.save_pretrained(tmp, state_dict=tensors)
                hf.generation_config.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                record["files"] = sorted(p.name for p in tmp.iterdir())
            else:
                scratch = tmp / ".tokenizer"
                tokenizer.save_pretrained(scratch)
                name = f"model-{gguf_type}.gguf"
                write_gguf(
                    tmp / name,
                    config,
                    tensors,
                    tokenizer,
                    scratch,
                    gguf_type,
                    name=str(record["source_model"]),
                    pre=gguf_pre,
                )
                shutil.rmtree(scratch)
                record["files"] = [name]
        atomic_write_json(tmp / EDIT_FILE, record)
        _readable(tmp)  # mkdtemp (and safetensors' writer) make owner-only files
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", record["source_model"], out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an existing ``out`` (force) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "dir")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "dir", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
