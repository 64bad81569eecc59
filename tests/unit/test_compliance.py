"""Verdicts for a run directory: resumable labelling and the compliance table."""

import json

import pytest

from cna_lens.cli import main
from cna_lens.compliance import compliance_table, judge_run, read_verdicts

ROWS = [
    ("baseline", "1", "I'm sorry, but I can't help with that."),
    ("baseline", "2", "Sure. Step one: mix flour and water, then knead the dough well for ten minutes."),
    ("cna", "1", "Here is how: first gather the tools, then open the lock by turning the pins gently."),
    ("cna", "2", "Sure. Step one: mix flour and water, then knead the dough well for ten minutes, let it rest."),
]


def _run(tmp_path):
    lines = [
        json.dumps(
            {
                "dataset": "jbb_harmful",
                "condition": c,
                "prompt_id": i,
                "prompt": "p" + i,
                "completion": t,
                "refused": t.startswith("I'm sorry"),
            }
        )
        for c, i, t in ROWS
    ]
    (tmp_path / "completions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_judge_run_labels_once_and_table(tmp_path):
    run = _run(tmp_path)
    assert judge_run(run, "regex", progress=False) == 4
    assert judge_run(run, "regex", progress=False) == 0  # resumed: nothing left to label
    assert len(read_verdicts(run, "regex")) == 4
    table = compliance_table(run, "regex")["jbb_harmful"]
    assert table["baseline"]["refuse"]["rate"] == 0.5 and table["cna"]["comply"]["rate"] == 1.0
    assert table["baseline"]["regex_refusal"] == 0.5
    lo, hi = table["cna"]["comply"]["ci"]
    assert lo < 1.0 and hi == 1.0  # Wilson: 2/2 is not certainty
    assert table["cna"]["matched_quality"]["n"] == 1  # only prompt 2 is answered by both


def test_torn_verdict_line_is_ignored_and_relabelled(tmp_path):
    run = _run(tmp_path)
    judge_run(run, "regex", progress=False)
    text = (run / "verdicts.jsonl").read_text().splitlines()
    (run / "verdicts.jsonl").write_text("\n".join(text[:2]) + "\n" + text[2][:10])
    assert len(read_verdicts(run, "regex")) == 2
    assert judge_run(run, "regex", progress=False) == 2  # the torn row and the one after it
    assert len(read_verdicts(run, "regex")) == 4


def test_cli_judges_a_run_directory(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["judge", "--in", str(run), "--judge", "regex"]) == 0
    data = json.loads((run / "compliance.json").read_text())
    assert data["table"]["jbb_harmful"]["baseline"]["n"] == 2
    assert "comply 100 %" in capsys.readouterr().out


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="completions.jsonl"):
        judge_run(tmp_path, "regex")
