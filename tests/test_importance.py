"""The importance that ranks channels: |gamma| (the default) and |gamma| weighted by the readers' weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.prune.importance import NAMES
from slim2deploy.prune.score import gamma_times_reader_norm, importance_score, max_abs_gamma
from slim2deploy.prune.select import Selection, by_ratio
from slim2deploy.prune.trace import trace_groups


class _Net(nn.Module):
    """conv-bn-relu, then two readers of those channels (a conv and, flattened, a linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(h.flatten(1)) + self.bn2(self.conv2(h)).mean((2, 3)).sum(1, keepdim=True)


def _group(model: nn.Module):
    traced = trace_groups(model, torch.zeros(1, 1, 4, 4), score=gamma_times_reader_norm)
    return next(g for g in traced.groups if any(m.tensor == "bn1.weight" for m in g.members))


def _net(seed: int) -> _Net:
    torch.manual_seed(seed)
    model = _Net().eval()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.1, 1.0)
    return model


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), conv_scale=st.floats(0.01, 100), fc_scale=st.floats(0.01, 100))
def test_gamma_out_ignores_each_readers_weight_scale_and_follows_how_much_the_channel_is_read(
    seed: int, conv_scale: float, fc_scale: float
) -> None:
    model = _net(seed)
    before = _group(model).scores
    with torch.no_grad():
        model.conv2.weight.mul_(conv_scale)
        model.fc.weight.mul_(fc_scale)
    assert _group(model).scores == pytest.approx(before, rel=1e-4)
    with torch.no_grad():  # channel 2 no longer read by either layer: ranked last whatever its gamma
        model.conv2.weight[:, 2] = 0
        model.fc.weight[:, 2 * 16 : 3 * 16] = 0
        model.bn1.weight[2] = 5.0
    scores = _group(model).scores
    assert scores is not None and scores[2] == 0 and min(scores) == 0 and sorted(scores)[1] > 0


def test_gamma_out_equals_gamma_where_every_input_channel_is_read_alike_and_keeps_zero_gammas_zero() -> None:
    model = _net(1)
    with torch.no_grad():
        model.conv2.weight.fill_(0.3)
        model.fc.weight.fill_(-0.2)
        model.bn1.weight[4] = 0.0
    group = _group(model)
    assert group.scores == pytest.approx(max_abs_gamma(model, group), rel=1e-5)
    assert group.scores is not None and group.scores[4] == 0


def test_a_selection_records_its_importance_and_refuses_an_unknown_one() -> None:
    selection = replace(by_ratio(0.5), importance="gamma-out")
    assert Selection.from_dict(selection.to_dict()) == selection
    assert "importance" not in by_ratio(0.5).to_dict()  # plans and cache keys of the default stay as they were
    assert "importance gamma-out" in selection.describe()
    with pytest.raises(SlimError, match="importance must be one of gamma, gamma-out"):
        Selection.from_dict({**selection.to_dict(), "importance": "taylor"})
    with pytest.raises(SlimError, match="`importance` 'taylor' is not one of"):
        importance_score("taylor")
    assert set(NAMES) == {"gamma", "gamma-out"}


def test_prune_with_gamma_out_keeps_the_channels_the_readers_use(tmp_path, cli) -> None:
    """Equal gammas except that the readers ignore half the channels: |gamma| cannot tell them apart (ties),
    gamma-out keeps exactly the channels that are read; the plan records the importance."""
    model = _net(2)
    with torch.no_grad():
        model.bn1.weight.fill_(0.5)
        model.bn1.weight[[0, 2, 4]] = 0.49  # |gamma| would remove these three
        model.conv2.weight[:, [1, 3, 5]] *= 1e-3  # but the readers barely use these three
        model.fc.weight.view(3, 6, 16)[:, [1, 3, 5]] *= 1e-3
    src = tmp_path / "net.pt"
    torch.save(model, src)  # a whole pickled module: needs trust and an input shape
    flags = ["--ratio", "0.4", "--min-channels", "1", "--round-to", "1", "--max-prune", "1", "--trust-code",
             "--input-shape", "1,4,4"]  # fmt: skip
    kept = {}
    for name in NAMES:
        status, _, err = cli("prune", "--model", src, "--out", tmp_path / f"{name}.pt", "--importance", name, *flags)
        assert status == 0, err
        plan = load_checkpoint(tmp_path / f"{name}.pt", trust_code=True).plan
        group = next(g for g in plan["groups"] if any(m["tensor"] == "bn1.weight" for m in g["members"]))
        kept[name] = group["keep"]
        assert plan["selection"].get("importance", "gamma") == name
    assert kept == {"gamma": [1, 3, 5], "gamma-out": [0, 2, 4]}
