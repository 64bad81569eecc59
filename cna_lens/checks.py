"""Argument checks that run before any model is loaded: cheap, and each error names its cause.

Every check raises ``ValueError`` (or ``FileNotFoundError``) with one line that says what was wrong
and what to do; the CLI calls :func:`check_args` on the parsed arguments before heavy work.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def fraction(value: float, name: str = "--fraction") -> float:
    """A share of all neurons: finite and in (0, 1]."""
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{name} {value}: must be a share in (0, 1], e.g. 0.001 for 0.1 %")
    return float(value)


def positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} {value}: must be a whole number ≥ 1")
    return value


def finite(value: float, name: str) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"{name} {value}: must be a finite number")
    return float(value)


def layer_list(spec: str, name: str = "--exclude-layers", n_layers: int | None = None) -> list[int]:
    """Comma-separated layer indices (``""`` = none), each in ``[0, n_layers)`` when known."""
    out = []
    for part in spec.split(","):
        if not part.strip():
            continue
        try:
            layer = int(part)
        except ValueError:
            raise ValueError(f"{name} {spec!r}: {part.strip()!r} is not a layer index") from None
        if layer < 0 or (n_layers is not None and layer >= n_layers):
            bound = f"[0, {n_layers})" if n_layers is not None else "≥ 0"
            raise ValueError(f"{name} {spec!r}: layer {layer} is out of range {bound}")
        out.append(layer)
    return out


def number_list(spec: str, name: str, check=finite) -> list[float]:
    """Comma-separated numbers, each passed through ``check``."""
    values = []
    for part in spec.split(","):
        if not part.strip():
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{name} {spec!r}: {part.strip()!r} is not a number") from None
        check(values[-1], name)
    if not values:
        raise ValueError(f"{name} is empty: give at least one value")
    return values


def model_spec(name: str) -> tuple[int, int] | None:
    """Check that ``name`` names a loadable model without loading it; ``(n_layers, d_mlp)`` where cheap.

    A packaged alias must be installed, a directory must hold ``config.json``, a ``.gguf`` must exist.
    """
    import json

    from .models import PACKAGED, _unknown_alias, cache_dir

    if name in PACKAGED:
        spec = PACKAGED[name]
        spec.part_paths()  # raises with the install command when parts are missing
        cfg = cache_dir() / "models" / f"{name}-{spec.sha256[:12]}" / "config.json"
        return _shape(json.loads(cfg.read_text())) if cfg.is_file() else None
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ValueError(f"--model {path}: a directory without config.json is not a Hugging Face model directory")
        try:
            return _shape(json.loads(cfg.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--model {path}: config.json is not valid JSON ({e})") from None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"--model {path}: GGUF file does not exist")
        return None
    if name.count("/") == 1 and not path.exists() and not name.startswith((".", "/", "~")):
        return None  # a hub id: only a download can tell
    raise _unknown_alias(name)


def _shape(cfg: dict[str, Any]) -> tuple[int, int] | None:
    cfg = cfg.get("text_config", cfg)
    layers, mlp = cfg.get("num_hidden_layers"), cfg.get("intermediate_size")
    return (int(layers), int(mlp)) if isinstance(layers, int) and isinstance(mlp, int) else None


def prompts(spec: str, name: str) -> list[str]:
    """A bundled dataset name or a prompt file, read now (errors name the file)."""
    from .datasets import DATASETS, load_prompts, read_prompt_file

    if spec in DATASETS:
        return load_prompts(spec)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{name} {spec!r} is neither a prompt file nor a bundled dataset ({', '.join(DATASETS)})"
        )
    return read_prompt_file(path)


def writable(path: str | os.PathLike, name: str = "--out") -> Path:
    """``path`` can be created or written: its nearest existing ancestor is a writable directory (an
    existing ``.json`` / ``.jsonl`` file is replaced, so its directory must be writable)."""
    p = Path(path).expanduser()
    file_out = p.suffix in (".json", ".jsonl")
    if p.is_dir() and file_out:
        raise ValueError(f"{name} {p} is a directory, not a file")
    probe = p.parent if file_out and p.is_file() else p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name} {p}: {probe} is a file, so nothing can be written below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {p}: {probe} is not writable")
    return p


def neurons(path: str, shape: tuple[int, int] | None = None):
    """Load a ``NeuronSet`` from ``neurons.json`` or a directory written by ``discover``; check its shape."""
    from .neurons import NeuronSet

    p = Path(path)
    file = p / "neurons.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"--neurons {path}: {file} does not exist (run `cna-lens discover` first)")
    try:
        ns = NeuronSet.load(file)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--neurons {file}: not a valid neuron set ({e})") from None
    if shape is not None and (ns.n_layers, ns.d_mlp) != shape:
        raise ValueError(
            f"--neurons {file} is for {ns.n_layers} layers × {ns.d_mlp} neurons, the model has {shape[0]} × {shape[1]}"
        )
    return ns


def check_args(args: Any) -> dict[str, Any]:
    """Check every argument the CLI knows by name; returns what was read on the way (prompts, neurons).

    Runs before the model loads, so a typo costs milliseconds, not a model load and a discovery pass.
    """
    got: dict[str, Any] = {}
    a = vars(args)
    shape = model_spec(a["model"]) if a.get("model") else None
    got["shape"] = shape
    for key in ("batch_size", "max_new_tokens", "n", "trials", "repeats"):
        if a.get(key) is not None:
            positive_int(a[key], "--" + key.replace("_", "-"))
    if isinstance(a.get("prompts"), int):  # `bench --prompts N`
        positive_int(a["prompts"], "--prompts")
    for key in ("limit", "k"):
        if a.get(key) is not None:
            positive_int(a[key], "--" + key)
    if a.get("k") is not None and shape is not None and a["k"] > shape[0] * shape[1]:
        raise ValueError(f"--k {a['k']}: the model has only {shape[0] * shape[1]} MLP neurons")
    for key in ("mmlu_limit", "kl_limit", "xstest_limit"):
        if a.get(key) is not None and (isinstance(a[key], bool) or a[key] < 0):
            raise ValueError(f"--{key.replace('_', '-')} {a[key]}: must be ≥ 0 (0 = skip)")
    if a.get("fraction") is not None:
        fraction(a["fraction"])
    if a.get("scale") is not None:
        finite(a["scale"], "--scale")
    if a.get("exclude_layers") is not None:
        layer_list(a["exclude_layers"], n_layers=shape[0] if shape else None)
    if a.get("fractions") is not None:
        number_list(a["fractions"], "--fractions", share_below_one)
    if a.get("caa_alphas") is not None:
        number_list(a["caa_alphas"], "--caa-alphas")
    for key, flag in (("positive", "--positive"), ("negative", "--negative"), ("prompts", "--prompts")):
        if isinstance(a.get(key), str):
            got[key] = prompts(a[key], flag)
    if isinstance(a.get("judge"), str):
        from .judge import resolve_judge

        resolve_judge(a["judge"])
    if a.get("engine") == "vllm":
        if a.get("neurons"):
            raise ValueError(
                "--engine vllm generates from weights: `cna-lens export` the edit, then --model that directory"
            )
        if a.get("response_prefix"):
            raise ValueError("--response-prefix needs one of the local engines, not --engine vllm")
        positive_int(a.get("tensor_parallel", 1), "--tensor-parallel")
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise ValueError("--engine vllm needs the vllm extra and a CUDA GPU (pip install 'cna-lens[vllm]')")
    if a.get("neurons"):
        got["neurons"] = neurons(a["neurons"], shape)
    if a.get("layer_alpha") is not None:
        finite(a["layer_alpha"], "--layer-alpha")
    if isinstance(a.get("selection"), str):
        from .selection import Selection

        try:
            Selection.load(a["selection"])
        except (OSError, KeyError, TypeError) as e:
            raise ValueError(f"--selection {a['selection']}: {e}") from None
    if a.get("out"):
        writable(a["out"])
    return got


def share_below_one(value: float, name: str) -> float:
    """A sweep fraction: a share in (0, 1), strictly below the whole model."""
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"{name} {value}: each must be a share in (0, 1)")
    return value
