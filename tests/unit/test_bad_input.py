"""Bad input to the command line: a one-line error that names the cause, before any model loads,
and no partial file left behind."""

from __future__ import annotations

import json

import pytest

from cna_lens import models
from cna_lens.cli import main
from cna_lens.neurons import NeuronSet


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: every check must come before it."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", boom)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def _neurons(path, n_layers=4, d_mlp=96):
    NeuronSet((2,), (3,), (1.0,), n_layers, d_mlp).save(path)
    return path


def bad_file(command: str, name: str, data: bytes | None, *words: str):
    """A case whose file ``name`` (holding ``data``) is the last argument of ``command``."""
    return {name: data}, [*command.split(), "{d}/" + name], list(words)


NEURONS = "generate --prompts jbb_harmful --neurons"

CASES = {
    # name: (files to create {name: bytes}, argv with {d} = tmp dir, words the error must contain)
    "empty prompt file": bad_file("discover --positive", "p.txt", b"", "p.txt", "no prompts"),
    "blank-only prompt file": bad_file("discover --positive", "p.txt", b"  \n\n\t\n", "p.txt", "no prompts"),
    "non-UTF-8 prompt file": bad_file("discover --negative", "p.txt", "Как\n".encode("cp1251"), "p.txt", "UTF-8"),
    "malformed JSON": bad_file("generate --prompts", "p.json", b'["a", ', "p.json", "invalid JSON"),
    "malformed JSONL": bad_file(
        "generate --prompts", "p.jsonl", b'{"prompt": "a"}\n{oops\n', "p.jsonl:2", "invalid JSON"
    ),
    "JSON object, not list": bad_file("generate --prompts", "p.json", b'{"prompt": "a"}', "p.json", "list"),
    "wrong item type": bad_file("generate --prompts", "p.json", b"[1, 2]", "p.json[0]", "string"),
    "missing prompt file": ({}, ["generate", "--prompts", "{d}/nope.txt"], ["nope.txt", "neither a prompt file"]),
    "unknown dataset": ({}, ["generate", "--prompts", "jbb_harmfull"], ["jbb_harmfull", "bundled dataset"]),
    "unknown alias": ({}, ["demo", "--model", "qwen-9000"], ["qwen-9000", "packaged alias"]),
    "model dir without config": ({"m/x.txt": b""}, ["demo", "--model", "{d}/m"], ["config.json"]),
    "missing gguf": ({}, ["demo", "--model", "{d}/w.gguf"], ["w.gguf", "does not exist"]),
    "fraction below 0": ({}, ["discover", "--fraction", "-0.1"], ["--fraction", "(0, 1]"]),
    "fraction above 1": ({}, ["discover", "--fraction", "1.5"], ["--fraction", "(0, 1]"]),
    "fraction NaN": ({}, ["discover", "--fraction", "nan"], ["--fraction"]),
    "k zero": ({}, ["discover", "--k", "0"], ["--k", "≥ 1"]),
    "k above the model": ({}, ["discover", "--k", "100000"], ["--k", "384"]),
    "layer out of range": ({}, ["discover", "--exclude-layers", "0,9"], ["--exclude-layers", "layer 9"]),
    "layer not a number": ({}, ["discover", "--exclude-layers", "0,x"], ["--exclude-layers", "'x'"]),
    "non-finite scale": ({}, ["generate", "--prompts", "jbb_harmful", "--scale", "inf"], ["--scale", "finite"]),
    "batch size zero": ({}, ["generate", "--prompts", "jbb_harmful", "--batch-size", "0"], ["--batch-size"]),
    "answer opening on vLLM": (
        {},
        ["generate", "--prompts", "jbb_harmful", "--engine", "vllm", "--response-prefix", "Sure"],
        ["--response-prefix", "local engines"],
    ),
    "missing neuron file": ({}, [*NEURONS.split(), "{d}/run"], ["run", "does not exist"]),
    "corrupt neuron file": bad_file(NEURONS, "n.json", b"{not json", "n.json", "JSON"),
    "neuron file of another kind": bad_file(
        NEURONS, "n.json", b'{"kind": "cna_lens.RunConfig"}', "n.json", "NeuronSet"
    ),
    "neurons of another model": bad_file(NEURONS, "n.json", None, "n.json", "28 layers"),
    "unwritable output path": (
        {"f": b"x"},
        ["generate", "--prompts", "jbb_harmful", "--out", "{d}/f/out.jsonl"],
        ["is a file"],
    ),
    "run directory that is a file": ({"r": b"x"}, ["reproduce", "--out", "{d}/r", "--limit", "2"], ["is a file"]),
    "sweep fraction of 1": ({}, ["reproduce", "--out", "{d}/r", "--fractions", "0.001,1"], ["--fractions", "(0, 1)"]),
    "limit out of range": ({}, ["reproduce", "--out", "{d}/r", "--limit", "0"], ["--limit"]),
    "held-out limit out of range": (
        {},
        ["reproduce", "--out", "{d}/r", "--heldout-limit", "573"],
        ["--heldout-limit 573", "572 prompts"],
    ),
    "replace without a selection": ({}, ["reproduce", "--out", "{d}/r", "--replace-selection"], ["needs --selection"]),
    "judged sweep of no tokens": (
        {},
        ["reproduce", "--out", "{d}/r", "--choose-tokens", "0"],
        ["choose_tokens", ">= 1"],
    ),
    "run dir of another configuration": (
        {"r/config.json": None},
        ["reproduce", "--out", "{d}/r", "--max-new-tokens", "8", "--limit", "2"],
        ["holds a run with", "another --out"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, llama_dir, capsys, no_model_load):
    files, argv, words = CASES[case]
    for name, data in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if case == "neurons of another model":
            _neurons(path, n_layers=28, d_mlp=8960)
        elif name == "r/config.json":  # a run of the same model with other settings
            path.write_text(json.dumps({"kind": "cna_lens.RunConfig", "model": llama_dir.name, "max_new_tokens": 99}))
        else:
            path.write_bytes(data)
    before = _files(tmp_path)
    argv = [a.format(d=tmp_path) for a in argv]
    if argv[0] == "discover":
        argv += ["--out", str(tmp_path / "o")]
    if "--model" not in argv:
        argv += ["--model", str(llama_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    assert _files(tmp_path) == before  # nothing written


def test_cases_cover_twenty_kinds():
    assert len(CASES) >= 20
