"""Depth under a latency goal: profiling prices removing residual branches, the closed loop removes dead ones, a
table without depth is refused only where a branch may go, and --no-depth never removes one.

``BlockTarget`` is a real target (the ``measure.targets.Target`` interface) whose latency the test controls: a
layer costs a staircase of its widths, and every BatchNorm a little per element it reads -- a cost the table's
layers do not model, which removing a branch saves too (what ``LatencyTable.calibrate_depth`` fits).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, snapshot
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.measure.targets import Target
from slim2deploy.model.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.model.sparsity import draw_sparse_gammas
from slim2deploy.model.zoo import create_model
from slim2deploy.pipeline.budget import prune_to_budget
from slim2deploy.prune.goal import by_budget
from slim2deploy.prune.latency import LatencyTable, LayerSpec
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import by_ratio, select
from slim2deploy.prune.trace import trace_groups

KWARGS = {"width": 0.25, "num_classes": 10}
SHAPE = (3, 16, 16)
DEAD = ("add in layer2.1", "add in layer3.0")  # the branches whose gammas are zero


def _cell_ms(kernel: Sequence[int], hw: Sequence[int], ci: int, co: int) -> float:
    return math.ceil(ci / 8) * math.ceil(co / 8) * math.prod(kernel) * math.prod(hw) * 1e-4


class BlockTarget(Target):
    name = "block-test"
    artifact = "checkpoint"

    def device(self) -> str:
        return "test"

    def open(self, path: str | os.PathLike[str]):
        raise SlimError("BlockTarget answers latencies() directly")

    def layer_ms(self, cells: Sequence[tuple[LayerSpec, int, int]]) -> list[float]:
        return [_cell_ms(layer.kernel, layer.in_hw, ci, co) for layer, ci, co in cells]

    def latencies(self, paths, **_: object) -> list[float]:
        return [self.model_ms(p) for p in paths]

    def model_ms(self, path: str | os.PathLike[str]) -> float:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt).eval()
        total: list[float] = []

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if isinstance(m, nn.Conv2d):
                total.append(_cell_ms(m.kernel_size, args[0].shape[2:], m.in_channels, m.out_channels))
            elif isinstance(m, nn.Linear):
                total.append(_cell_ms([], [], m.in_features, m.out_features))
            else:  # a BatchNorm: what no table layer models
                total.append(2e-4 * args[0][0].numel())

        kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, kinds)]
        with torch.no_grad():
            model(torch.zeros(1, *ckpt.input_shape))
        for h in handles:
            h.remove()
        return 0.2 + sum(total)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> Path:
    """resnet20 at width 0.25 with gammas as sparse training leaves them, and two branches' gammas all zero."""
    torch.manual_seed(0)
    model = draw_sparse_gammas(create_model("resnet20", **KWARGS).eval(), 0.5, seed=0)
    traced = trace_groups(model, torch.zeros(1, *SHAPE))
    with torch.no_grad():
        for b in traced.branches:
            if b.join in DEAD:
                for fqn in b.gammas[0]:
                    model.get_parameter(fqn).zero_()
    path = tmp_path_factory.mktemp("depth") / "sparse.pt"
    return save_checkpoint(checkpoint_for(model, "resnet20", KWARGS, SHAPE, 10), path)


def _removed(path: Path) -> set[str]:
    plan = load_checkpoint(path).plan
    assert plan is not None
    return {b.join for b in PruningPlan.from_dict(plan).removed_branches()}


def test_a_latency_goal_removes_the_dead_branches_and_the_table_prices_removal(sparse, tmp_path):
    target, table_path = BlockTarget(batch=2), tmp_path / "table.json"
    budget = by_budget(speedup=1.4, batch=2, cache=None, no_cache=True)
    result = prune_to_budget(sparse, tmp_path / "slim.pt", budget, target=target, table_out=table_path, log=None)

    assert result.met and set(DEAD) <= _removed(tmp_path / "slim.pt")
    assert "blocks removed:" in result.summary
    table = LatencyTable.from_json(table_path.read_text())
    assert table.depth and len(table.branches) == 9 and all(b.layers for b in table.branches)
    assert all(b.extra_ms > 0 for b in table.branches)  # their BatchNorms: what the table's layers leave out
    # the BatchNorms of the branches that stay are in no layer either: near, not exact
    assert result.chosen["predicted_ms"] == pytest.approx(result.chosen["measured_ms"], rel=0.02)
    assert target.model_ms(tmp_path / "slim.pt") == pytest.approx(result.chosen["measured_ms"])


def test_without_depth_nothing_is_removed_and_a_width_only_table_is_refused_for_depth(sparse, tmp_path):
    target, table_path = BlockTarget(batch=2), tmp_path / "table.json"
    width_only = by_budget(depth=False, speedup=1.05, batch=2, cache=None, no_cache=True)
    result = prune_to_budget(sparse, tmp_path / "a.pt", width_only, target=target, table_out=table_path, log=None)
    assert not _removed(tmp_path / "a.pt") and all(g.keep for g in result.plan.groups)
    table = LatencyTable.from_json(table_path.read_text())
    assert not table.depth and not table.branches
    with pytest.raises(SlimError, match=r"profiled without depth.* prune with `depth=False`") as err:
        prune_to_budget(
            sparse, tmp_path / "b.pt", by_budget(speedup=1.2, batch=2, table=str(table_path)), target=target
        )
    assert "\n" not in str(err.value) and not (tmp_path / "b.pt").exists()


def test_a_table_with_depth_serves_a_pruning_without(sparse, tmp_path):
    target, table_path = BlockTarget(batch=2), tmp_path / "table.json"
    budget = by_budget(speedup=1.4, batch=2, cache=None, no_cache=True)
    prune_to_budget(sparse, tmp_path / "a.pt", budget, target=target, table_out=table_path, log=None)
    again = by_budget(depth=False, speedup=1.05, batch=2, table=str(table_path))
    result = prune_to_budget(sparse, tmp_path / "b.pt", again, target=target, log=None)
    assert result.met and not _removed(tmp_path / "b.pt")


def test_a_kept_layer_never_goes_with_its_branch(sparse):
    ckpt = load_checkpoint(sparse)
    model = model_from_checkpoint(ckpt)
    traced = trace_groups(model, torch.zeros(1, *SHAPE))
    dead = next(b for b in traced.branches if b.join == DEAD[0])
    layer = next(m.module for m in traced.groups[dead.groups[0]].members if m.role == "out")
    assert dead.join in {b.join for b in select(traced, by_ratio(0.3)).removed_branches()}
    kept = select(traced, by_ratio(0.3, keep=[layer]))
    assert dead.join not in {b.join for b in kept.removed_branches()} and kept.groups[dead.groups[0]].keep


def test_the_cli_ratio_removes_dead_branches_and_no_depth_never_does(sparse, tmp_path, cli):
    status, out, _ = cli("prune", "--model", sparse, "--out", tmp_path / "d.pt", "--ratio", "0.3")
    assert status == 0 and set(DEAD) <= _removed(tmp_path / "d.pt") and "blocks removed: 2 of 9" in out
    status, out, _ = cli("prune", "--model", sparse, "--out", tmp_path / "w.pt", "--ratio", "0.3", "--no-depth")
    assert status == 0 and not _removed(tmp_path / "w.pt") and "blocks removed: 0 of 9" in out
    before = snapshot(tmp_path)
    both = cli("prune", "--model", sparse, "--out", tmp_path / "x.pt", "--ratio", "0.3", "--depth", "--no-depth")
    assert both[0] == 2 and "not allowed with" in both[2] and snapshot(tmp_path) == before


@pytest.mark.slow
def test_the_cli_prunes_to_a_speedup_on_onnx_runtime_removing_dead_branches(sparse, tmp_path, cli):
    """The real target: profile (with the model without its branches), prune, measure; then a width-only table."""
    table, cache = tmp_path / "table.json", tmp_path / "cache"
    goal = ["--speedup", "1.3", "--profile-batch", "2", "--tries", "2"]
    status, out, err = cli("prune", "--model", sparse, "--out", tmp_path / "s.pt", *goal, "--cache", cache,
                           "--save-table", table)  # fmt: skip
    assert status == 0, err
    assert set(DEAD) <= _removed(tmp_path / "s.pt") and "measured on ort-cpu" in out
    assert LatencyTable.from_json(table.read_text()).branches
    narrow = tmp_path / "narrow.json"
    status, _, err = cli("profile", "--model", sparse, "--out", narrow, "--profile-batch", "2", "--cache", cache,
                         "--no-depth")  # fmt: skip
    assert status == 0, err
    before = snapshot(tmp_path)
    refused = cli("prune", "--model", sparse, "--out", tmp_path / "t.pt", *goal, "--table", narrow)
    assert_refused(refused, "profiled without depth", before, tmp_path)
    loose = ["--latency-ms", "1000", "--profile-batch", "2", "--tries", "1"]  # width alone reaches little here
    status, _, err = cli(
        "prune", "--model", sparse, "--out", tmp_path / "t.pt", *loose, "--table", narrow, "--no-depth"
    )
    assert status == 0 and not _removed(tmp_path / "t.pt"), err


def test_inspect_and_the_build_report_show_what_depth_removed(sparse, tmp_path, cli):
    out = tmp_path / "build"
    status, _, err = cli("build", "--model", sparse, "--out", out, "--ratio", "0.3", "--engine", "off",
                         "--bench-batch", "1,4", "--bench-iterations", "3", "--bench-rounds", "1")  # fmt: skip
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    assert set(report["structure"]["blocks_removed"]) == set(DEAD) and report["structure"]["blocks_removable"] == 9
    graphs = report["structure"]["graphs"]
    assert graphs["baseline"]["layers"] == 22 and graphs["slim"]["layers"] == 22 - 2 * len(DEAD)
    assert graphs["slim"]["nodes"] < graphs["baseline"]["nodes"]
    assert set(report["latency"]) == {"1", "4"} and all(v["slim_ms"] > 0 for v in report["latency"].values())
    md = (out / "report.md").read_text()
    assert "Residual blocks removed: 2 of 9 removable (" in md and "| conv/linear layers (ONNX) | 22 | 18 |" in md
    assert "| ONNX nodes |" in md and "latency, batch 1 (" in md and "latency, batch 4 (" in md
    status, shown, _ = cli("inspect", "--model", out / "slim.pt")
    assert status == 0 and "layers     18 convolutions and linears (unpruned: 22)" in shown
    assert "removed    2 residual block(s)" in shown
