"""Figure files: written once per content, PNGs from one export call, nothing stale left beside them."""

import logging

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from cna_lens.plot import method_curves, save_figure, save_figures
from cna_lens.report import hand_label_table


def line(ys, **layout):
    return go.Figure(go.Scatter(x=list(range(len(ys))), y=ys), layout=layout)


@pytest.fixture
def exports(monkeypatch):
    """Stands in for kaleido: records each ``write_images`` call and writes the figures' JSON as the image."""
    calls = []

    def write_images(figs, files, scale=None, width=None, height=None):
        assert (width, height) == ([f.layout.width for f in figs], [f.layout.height for f in figs])
        calls.append([f.name for f in files])
        for fig, f in zip(figs, files):
            f.write_text(fig.to_json())

    monkeypatch.setattr(pio, "write_images", write_images)
    return calls


def test_pngs_in_one_call_and_unchanged_figures_left_alone(tmp_path, exports):
    figs = {tmp_path / "a.1": line([1, 2]), tmp_path / "sub" / "b": line([3, 1], height=600)}
    written = save_figures(figs)
    assert exports == [["a.1.png", "b.png"]]  # stems may hold dots; a new folder is made
    assert sorted(p.name for p in written) == ["a.1.html", "a.1.png", "b.html", "b.png"]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    assert save_figures({tmp_path / "a.1": line([1, 2]), tmp_path / "sub" / "b": line([3, 1], height=600)}) == written
    assert len(exports) == 1 and {p: p.stat().st_mtime_ns for p in written} == stamps  # the same figures
    save_figures({tmp_path / "a.1": line([1, 2]), tmp_path / "sub" / "b": line([3, 2])})
    assert exports[1] == ["b.png"]  # only the changed one
    assert (tmp_path / "sub" / "b.png").read_text() == line([3, 2]).to_json()
    (tmp_path / "a.1.png").unlink()
    save_figure(line([1, 2]), tmp_path / "a.1")
    assert exports[2] == ["a.1.png"]  # a missing PNG is drawn again


def test_without_png_a_stale_png_goes(tmp_path, exports):
    save_figure(line([1, 2]), tmp_path / "f")
    assert save_figure(line([1, 2]), tmp_path / "f", png=False) == [tmp_path / "f.html", tmp_path / "f.png"]
    assert save_figure(line([2, 1]), tmp_path / "f", png=False) == [tmp_path / "f.html"]  # it showed the old one
    assert len(exports) == 1
    assert '"y":[2,1]' in (tmp_path / "f.html").read_text()


def test_failed_export_keeps_html_and_tries_again(tmp_path, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("no Chrome")

    monkeypatch.setattr(pio, "write_images", fail)
    with caplog.at_level(logging.WARNING, logger="cna_lens.plot"):
        assert save_figure(line([1]), tmp_path / "f") == [tmp_path / "f.html"]
    assert "no Chrome" in caplog.text
    tried = []
    monkeypatch.setattr(pio, "write_images", lambda figs, files, **kw: tried.append(files))
    save_figure(line([1]), tmp_path / "f")
    assert tried == [[tmp_path / "f.png"]]  # the HTML is there, the PNG is not: drawn again


def test_a_png_cut_short_is_drawn_again(tmp_path, exports, monkeypatch):
    """The PNG is written before its HTML: a stop while writing it leaves the old HTML, so the next call redraws."""
    save_figure(line([1, 2]), tmp_path / "f")

    def cut_short(figs, files, **kw):
        files[0].write_text("partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pio, "write_images", cut_short)
        with pytest.raises(KeyboardInterrupt):
            save_figure(line([2, 1]), tmp_path / "f")
    save_figure(line([2, 1]), tmp_path / "f")
    assert len(exports) == 2 and (tmp_path / "f.png").read_text() == line([2, 1]).to_json()


def test_png_size_is_the_layouts(tmp_path):
    """With kaleido and a Chrome: each PNG is its figure's layout size (plotly's default where unset) × 2."""
    pytest.importorskip("kaleido")
    figs = {tmp_path / "sized": line([1, 2], width=900, height=600), tmp_path / "plain": line([2, 1])}
    if len(save_figures(figs)) < 4:
        pytest.skip("static export needs a Chrome (apt-get install -y chromium)")
    for name, size in (
        ("sized", (1800, 1200)),
        ("plain", (2 * pio.defaults.default_width, 2 * pio.defaults.default_height)),
    ):
        head = (tmp_path / f"{name}.png").read_bytes()[16:24]  # the PNG header's width and height
        assert (int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")) == size, name


def test_hand_labels_drawn_at_their_conditions_kl_and_tabled_beside_the_judge():
    """A hand-labelled condition appears on the KL panel at its curve point's KL with its Wilson interval,
    and in the report beside the judge's rate; one without a KL point is tabled but not drawn."""
    rate = {"count": 47, "rate": 0.47, "ci": [0.38, 0.57]}
    none = {"count": 0, "rate": 0.0, "ci": [0.0, 0.04]}
    results = {
        "config": {"model": "m"},
        "chosen": "cna:abs:0.003",
        "curves": {
            "direction": [
                {"condition": "baseline", "kl": 0.0, "compliance": 0.12},
                {"condition": "direction:16:0.75", "kl": 0.032, "compliance": 0.46},
            ]
        },
        "hand_labels": {
            "direction:16:0.75": {"labelled_as": "direction:16:0.75", "comply": rate, "evade": rate, "refuse": none},
            "selection": {"labelled_as": "selection:27", "comply": rate, "evade": rate, "refuse": none},
        },
        "compliance": {
            "jbb_harmful": {"direction:16:0.75": {"comply": {"count": 46, "rate": 0.46, "ci": [0.37, 0.56]}}}
        },
    }
    fig = method_curves(results)
    hand = [tr for tr in fig.data if tr.name == "read blind by hand"]
    assert [tr.xaxis for tr in hand] == ["x", "x2"]  # the full KL panel and its zoom, not the MMLU one
    for tr in hand:
        assert list(tr.x) == [0.032] and list(tr.y) == [0.47]
        assert list(tr.error_y.array) == pytest.approx([0.10])
        assert list(tr.error_y.arrayminus) == pytest.approx([0.09])
    assert fig.layout.xaxis2.range[1] == 0.3
    rows = [r for r in hand_label_table(results) if r.startswith("| ") and "`" in r]
    assert len(rows) == 2
    assert rows[0].endswith("| `direction:16:0.75` | 47 [38–57] | 47 | 0 | 46 |")
    assert rows[1].endswith("| `selection:27` | 47 [38–57] | 47 | 0 | — |")
    assert hand_label_table({}) == []
