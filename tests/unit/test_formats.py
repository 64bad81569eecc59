"""One save/load convention: every result round-trips, and a file of another format_version is refused."""

from __future__ import annotations

import json

import pytest
import torch

from cna_lens.attribute import Attribution
from cna_lens.circuits import LayerMap, NeuronEffects
from cna_lens.compare import Comparison
from cna_lens.neurons import NeuronSet


def _attribution():
    g = torch.Generator().manual_seed(0)
    stats = {
        k: torch.rand(3, 5, generator=g, dtype=torch.float64) for k in ("sum_pos", "sum_neg", "sumsq_pos", "sumsq_neg")
    }
    return Attribution("m", "mlp.hook_post", 4, 6, **stats)


RESULTS = {
    # name: (object, file to save to relative to tmp, file holding format_version)
    "NeuronSet": (lambda: NeuronSet((2, 1), (3, 0), (1.0, 0.5), 3, 5), "n.json", "n.json"),
    "Attribution": (_attribution, "attr", "attr/attribution.json"),
    "LayerMap": (
        lambda: LayerMap("m", 0.5, torch.tensor([0.1, float("nan")]), torch.zeros(2), torch.ones(2), (1, 0), 4),
        "lm",
        "lm/layer_map.json",
    ),
    "NeuronEffects": (lambda: NeuronEffects("m", 0.5, (1,), (2,), (0.3,), (-0.2,), 4), "ne.json", "ne.json"),
    "Comparison": (lambda: Comparison("a", "b", (0.5, 0.25), {10: 0.5}, ({"layer": 1},)), "c.json", "c.json"),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_round_trip_and_version_check(name, tmp_path):
    make, target, meta = RESULTS[name]
    obj = make()
    obj.save(tmp_path / target)
    back = type(obj).load(tmp_path / target)
    for field in obj.__dataclass_fields__:
        a, b = getattr(obj, field), getattr(back, field)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), field
        else:
            assert a == b, field
    data = json.loads((tmp_path / meta).read_text())
    assert data["format_version"] == 1
    data["format_version"] = 999
    (tmp_path / meta).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version 999"):
        type(obj).load(tmp_path / target)
