"""``cna-lens export``: argument errors before any model load; a loadable directory otherwise."""

import json

from cna_lens.cli import main
from cna_lens.neurons import NeuronSet


def write_neurons(path, n_layers=4, d_mlp=96):
    NeuronSet((2, 3), (5, 7), (1.0, 0.5), n_layers, d_mlp).save(path)
    return path


def test_export_writes_an_hf_directory(llama_dir, tmp_path, capsys):
    neurons = write_neurons(tmp_path / "neurons.json")
    out = tmp_path / "edited"
    assert main(["export", "--model", str(llama_dir), "--neurons", str(neurons), "--out", str(out)]) == 0
    assert "2 neurons × 0 written as hf" in capsys.readouterr().out
    record = json.loads((out / "cna_lens_edit.json").read_text())
    assert record["dtype"] == "float32" and record["edits"][0]["layers"] == [2, 3]
    assert record["provenance"]["neurons_file"] == str(neurons.resolve())
    # a run directory works as well, and --force replaces the output
    run = tmp_path / "run"
    run.mkdir()
    write_neurons(run / "neurons.json")
    args = ["export", "--model", str(llama_dir), "--neurons", str(run), "--out", str(out), "--format", "gguf"]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--force", "--gguf-type", "q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cna_lens_edit.json", "model-q8_0.gguf"]


def test_export_argument_errors_come_before_loading(llama_dir, tmp_path, capsys, monkeypatch):
    from cna_lens import models

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", boom)
    neurons = write_neurons(tmp_path / "neurons.json")
    model = ["--model", str(llama_dir)]
    cases = [
        ([*model, "--neurons", str(neurons), "--out", str(tmp_path / "o"), "--scale", "nan"], "finite"),
        ([*model, "--neurons", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")], "does not exist"),
        ([*model, "--neurons", str(neurons), "--out", str(tmp_path)], "already exists"),
        ([*model, "--neurons", str(neurons), "--out", str(tmp_path / "o"), "--process-weights"], "process-weights"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        assert message in capsys.readouterr().err
    wrong = write_neurons(tmp_path / "wrong.json", n_layers=5)
    assert main(["export", "--model", str(llama_dir), "--neurons", str(wrong), "--out", str(tmp_path / "o")]) == 2
    assert "5 layers × 96 neurons" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
