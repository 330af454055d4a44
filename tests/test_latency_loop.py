"""Profiling, the cell cache and the closed loop, on a target whose latency the test controls.

``WidthTarget`` is a real target (the ``measure.targets.Target`` interface): it runs slim2deploy
checkpoints and answers with a latency computed from the model's actual layer widths -- a
staircase in steps of 16 channels, like a runtime with blocked kernels. ``load`` slows whole
models down the way a busier machine (or a colder cache) does after the table was profiled, so
a table's prediction can miss and the loop has to correct it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.measure.targets import TIMING_METHOD, CellCache, Target, make_target
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.pipeline.budget import MISS_TOLERANCE, OVERSHOOT, prune_to_budget
from slim2deploy.pipeline.profile import layer_specs
from slim2deploy.prune.goal import Budget, by_budget
from slim2deploy.prune.latency import LatencyTable, LayerSpec
from slim2deploy.prune.latency_solve import OutOfReach
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.trace import trace_groups


def budget_of(rails: Rails | None = None, **settings):
    """A latency-goal selection (``cache=None``: keep no cache, as these tests mean it)."""
    if "cache" in settings and settings["cache"] is None:
        settings.update(cache=None, no_cache=True)
    return by_budget(rails, **settings)


DEMO = ROOT / "demo" / "vgg11-w0.25-sparse.pt"
STEP = 16


def cell_ms(kernel: Sequence[int], hw: Sequence[int], ci: int, co: int) -> float:
    return math.ceil(ci / STEP) * math.ceil(co / STEP) * math.prod(kernel) * math.prod(hw) * 1e-4


class WidthTarget(Target):
    name = "width-test"
    artifact = "checkpoint"

    def __init__(self, batch: int = 64) -> None:
        super().__init__(batch=batch)
        self.load = 1.0
        self.cells_timed = 0
        self.models_timed = 0

    def device(self) -> str:
        return "test"

    def open(self, path: str | os.PathLike[str]):
        raise SlimError("WidthTarget answers latencies() directly")

    def layer_ms(self, cells: Sequence[tuple[LayerSpec, int, int]]) -> list[float]:
        self.cells_timed += len(cells)
        return [cell_ms(layer.kernel, layer.in_hw, ci, co) for layer, ci, co in cells]

    def latencies(self, paths, **_: object) -> list[float]:
        self.models_timed += len(paths)
        return [self.model_ms(p) for p in paths]

    def model_ms(self, path) -> float:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt).eval()
        total: list[float] = []

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if isinstance(m, nn.Conv2d):
                total.append(cell_ms(m.kernel_size, args[0].shape[2:], m.in_channels, m.out_channels))
            else:
                total.append(cell_ms([], [], m.in_features, m.out_features))

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        with torch.no_grad():
            model(torch.zeros(1, *ckpt.input_shape))
        for h in handles:
            h.remove()
        return self.load * (0.2 + sum(total))


def test_layer_specs_of_the_demo_vgg():
    ckpt = load_checkpoint(DEMO)
    model = model_from_checkpoint(ckpt)
    x = torch.zeros(1, *ckpt.input_shape)
    traced = trace_groups(model, x)
    specs = {s.name: s for s in layer_specs(model, traced, x)}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(convs) <= set(specs)  # every conv reads or writes a prunable group
    first = specs[convs[0]]
    assert first.in_fixed == ckpt.input_shape[0] and first.in_hw == list(ckpt.input_shape[1:])
    sizes = [g.size for g in traced.groups]
    for name, spec in specs.items():  # the widths at full size are the module's own
        m = model.get_submodule(name)
        full = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        assert spec.widths(sizes) == full


def _as_measured_on(table_path: Path, target: str, batch: int = 64) -> None:
    """Relabel a WidthTarget table as one measured on ``target``: its synthetic cells stand in for real ones."""
    table = LatencyTable.from_json(table_path.read_text())
    table.meta.update(target=target, batch=batch)
    table_path.write_text(table.to_json())


def test_closed_loop_meets_the_budget_on_the_target(tmp_path):
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    quiet = prune_to_budget(
        DEMO, tmp_path / "a.pt", budget_of(speedup=1.5, cache=None), target=target, table_out=table_path, log=None
    )
    assert quiet.met and len(quiet.tries) == 1  # the table is exact while nothing changes
    assert quiet.chosen["predicted_ms"] == pytest.approx(quiet.chosen["measured_ms"], rel=1e-6)
    full_ms = LatencyTable.from_json(table_path.read_text()).full_ms
    target.load = 1.2  # the machine got slower after profiling: the table now under-predicts
    budget = budget_of(latency_ms=0.7 * full_ms, table=str(table_path), tries=6, rails=Rails())
    result = prune_to_budget(DEMO, tmp_path / "slim.pt", budget, target=target, log=None)
    first = result.tries[0]
    assert first["measured_ms"] > first["goal_ms"] * (1 + MISS_TOLERANCE)
    assert 1 < len(result.tries) <= budget.selector.tries
    assert result.met and result.chosen == result.tries[-1]
    assert result.chosen["measured_ms"] <= result.chosen["goal_ms"] * (1 + MISS_TOLERANCE)
    assert target.model_ms(tmp_path / "slim.pt") == pytest.approx(result.chosen["measured_ms"])
    kept = [len(g.keep) for g in result.plan.groups]
    assert all(k % 8 == 0 or k == g.size for k, g in zip(kept, result.plan.groups, strict=True))  # rails apply
    notes = "\n".join(result.plan.notes)
    assert "predicted" in notes and "measured on" in notes and " met " in notes
    assert "measured on" in result.summary
    saved = load_checkpoint(tmp_path / "slim.pt")
    assert saved.plan is not None and saved.plan["selection"]["selector"]["kind"] == "latency"


def test_closed_loop_that_cannot_meet_the_goal_ends_at_the_smallest_model_and_says_so(tmp_path):
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    prune_to_budget(
        DEMO, tmp_path / "a.pt", budget_of(speedup=1.2, cache=None), target=target, table_out=table_path, log=None
    )
    full_ms = LatencyTable.from_json(table_path.read_text()).full_ms
    target.load = 3.0  # now nothing the rails allow is fast enough
    budget = budget_of(latency_ms=0.7 * full_ms, table=str(table_path), tries=6)
    result = prune_to_budget(DEMO, tmp_path / "slim.pt", budget, target=target, log=None)
    assert not result.met and len(result.tries) <= budget.selector.tries
    smallest = min(t["measured_ms"] for t in result.tries)
    assert result.chosen["measured_ms"] == smallest  # the closest miss is kept
    assert any("MISSED" in n for n in result.plan.notes) and (tmp_path / "slim.pt").exists()


def test_equal_cost_counts_are_not_kept_narrower(tmp_path):
    """With a staircase of 16, a solution never keeps 8 + 16k channels where 16 + 16k costs the same."""
    target = WidthTarget()
    budget = budget_of(speedup=1.5, cache=None)
    result = prune_to_budget(DEMO, tmp_path / "slim.pt", budget, target=target, log=None)
    for g in result.plan.groups:
        if g.prunable:
            assert len(g.keep) % STEP == 0 or len(g.keep) == g.size


def test_cells_are_cached_by_target_key(tmp_path):
    ckpt = load_checkpoint(DEMO)
    model = model_from_checkpoint(ckpt)
    x = torch.zeros(1, *ckpt.input_shape)
    specs = layer_specs(model, trace_groups(model, x), x)
    cells = [(s, s.in_fixed or 8, s.out_fixed or 8) for s in specs]
    target = WidthTarget()
    assert CellCache(target, tmp_path).measure(target, cells) == len({CellCache.cell_key(*c) for c in cells})
    timed = target.cells_timed
    assert CellCache(target, tmp_path).measure(target, cells) == 0 and target.cells_timed == timed
    other = WidthTarget(batch=32)  # another batch is another measurement
    assert CellCache(other, tmp_path).measure(other, cells) > 0
    assert all(s.measured() for s in specs)


def test_unreachable_budget_and_a_table_for_another_model(tmp_path):
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    with pytest.raises(SlimError, match=r"out of reach.*speed-up of \d+\.\d\dx"):
        prune_to_budget(DEMO, tmp_path / "s.pt", budget_of(speedup=50.0, cache=None), target=target, log=None)
    prune_to_budget(
        DEMO, tmp_path / "s.pt", budget_of(speedup=1.2, cache=None), target=target, table_out=table_path, log=None
    )
    for goal in ({"latency_ms": 1.0}, {"speedup": 1.2}):  # steps and ms measured at batch 64 are not batch 32's
        with pytest.raises(SlimError, match=r"`profile_batch` 64 \(this run: 32\).*re-run 'slim2deploy profile'"):
            prune_to_budget(DEMO, tmp_path / "b.pt", budget_of(**goal, table=str(table_path)), target=WidthTarget(32))
    assert not (tmp_path / "b.pt").exists()
    table = LatencyTable.from_json(table_path.read_text())
    table.sizes[1] += 8
    table_path.write_text(table.to_json())
    with pytest.raises(SlimError, match="profiled for"):
        prune_to_budget(DEMO, tmp_path / "t.pt", budget_of(speedup=1.2, table=str(table_path)), target=target, log=None)
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize(
    "goal,needle",
    [
        ({"speedup": 1.0}, "--speedup"),
        ({"speedup": 0.5}, "--speedup"),
        ({"speedup": math.inf}, "--speedup"),
        ({"speedup": math.nan}, "--speedup"),
        ({"latency_ms": 0.0}, "--latency-ms"),
        ({"latency_ms": -2.0}, "--latency-ms"),
        ({"latency_ms": math.nan}, "--latency-ms"),
    ],
)
def test_a_goal_that_means_nothing_is_refused_before_profiling(goal, needle):
    needle = needle.replace("--", "`").replace("-", "_") + "`"  # the library names its parameters
    with pytest.raises(SlimError, match=needle):
        Budget(**goal)


def test_trt_target_is_refused_with_advice_that_leads_somewhere():
    trt = make_target("trt")
    for attempt in (lambda: trt.layer_ms([]), lambda: trt.open("m.engine")):
        with pytest.raises(SlimError, match="only in 'slim2deploy build'.*ort-cpu") as refused:
            attempt()
        assert "`table`" not in str(refused.value)  # a table from elsewhere would still be verified on trt


def test_cli_budget_flags(tmp_path):
    both = run_main("prune", "--model", str(DEMO), "--out", str(tmp_path / "s.pt"), "--ratio", "0.5", "--speedup", "2")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    table_path = tmp_path / "table.json"
    prune_to_budget(
        DEMO,
        tmp_path / "w.pt",
        budget_of(speedup=1.2, cache=None),
        target=WidthTarget(),
        table_out=table_path,
        log=None,
    )
    _as_measured_on(table_path, "ort-cpu")  # what the command measures on by default
    far = run_main(
        "prune", "--model", str(DEMO), "--out", str(tmp_path / "s.pt"), "--speedup", "50", "--table", str(table_path)
    )
    errors = [line for line in far.stderr.splitlines() if "error:" in line]
    assert far.returncode == 2 and len(errors) == 1 and "out of reach" in errors[0], far.stderr
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.slow
def test_cli_profile_and_prune_on_ort_cpu(tmp_path):
    """The real thing: profile the demo VGG on ONNX Runtime, then prune to 1.5x with the table."""
    table_path, cache = tmp_path / "vgg.json", tmp_path / "cache"
    prof = run_main(
        "profile",
        "--model",
        str(DEMO),
        "--target",
        "ort-cpu",
        "--profile-batch",
        "16",
        "--cache",
        str(cache),
        "--out",
        str(table_path),
    )
    assert prof.returncode == 0, prof.stderr
    assert "latency steps up" in prof.stdout
    table = LatencyTable.from_json(table_path.read_text())
    assert table.meta["target"] == "ort-cpu" and table.meta["batch"] == 16 and table.full_ms > 0
    assert all(layer.cells for layer in table.layers) and list(cache.glob("ort-cpu-*.json"))
    out = tmp_path / "slim.pt"
    pruned = run_main(
        "prune",
        "--model",
        str(DEMO),
        "--out",
        str(out),
        "--speedup",
        "1.5",
        "--table",
        str(table_path),
        "--profile-batch",
        "16",
        "--tries",
        "2",
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "predicted" in pruned.stdout and "measured on ort-cpu" in pruned.stdout
    assert load_checkpoint(out).plan["selection"]["selector"]["kind"] == "latency"


@pytest.mark.slow
def test_build_with_a_speedup_reports_predicted_and_measured(tmp_path):
    table_path = tmp_path / "table.json"
    prune_to_budget(
        DEMO,
        tmp_path / "w.pt",
        budget_of(speedup=1.2, cache=None),
        target=WidthTarget(),
        table_out=table_path,
        log=None,
    )
    _as_measured_on(table_path, "ort-cpu", batch=8)
    out = tmp_path / "build"
    done = run_main(
        "build", "--model", str(DEMO), "--out", str(out), "--speedup", "1.3", "--table", str(table_path),
        "--profile-batch", "8", "--tries", "2", "--engine", "off", "--no-bench", "--eval-limit", "200",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "Latency budget: speed-up 1.3x" in report and "predicted ms" in report
    assert (out / "latency-table.json").exists()


def test_the_goal_is_aimed_under_by_the_margin(tmp_path):
    """An exact table (nothing changes after profiling): the margin is what the slim model has to spare."""
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    at = prune_to_budget(
        DEMO, tmp_path / "a.pt", budget_of(speedup=1.5, margin=0.0, cache=None), target=target, table_out=table_path
    )
    under = prune_to_budget(
        DEMO, tmp_path / "b.pt", budget_of(speedup=1.5, margin=0.2, table=str(table_path)), target=target, log=None
    )
    goal = under.chosen["goal_ms"]
    assert at.met and under.met and len(under.tries) == 1
    assert under.chosen["measured_ms"] <= goal * 0.8 * (1 + 1e-9) < at.chosen["measured_ms"] <= goal


def test_a_goal_only_the_margin_puts_out_of_reach_gets_the_smallest_model(tmp_path):
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    prune_to_budget(
        DEMO, tmp_path / "a.pt", budget_of(speedup=1.2, cache=None), target=target, table_out=table_path, log=None
    )
    table = LatencyTable.from_json(table_path.read_text())
    ckpt = load_checkpoint(DEMO)
    traced = trace_groups(model_from_checkpoint(ckpt), torch.zeros(1, *ckpt.input_shape))
    rails = Rails()
    floor = [
        min(set(rails.allowed(g.size)) & set(steps)) if g.prunable else g.size
        for steps, g in zip(table.steps, traced.groups, strict=True)
    ]
    floor_ms = table.predict(floor)
    budget = budget_of(latency_ms=floor_ms, margin=0.1, table=str(table_path), rails=rails)
    result = prune_to_budget(DEMO, tmp_path / "s.pt", budget, target=target, log=None)
    assert result.met and len(result.tries) == 1  # no retry: the rails' smallest model was the aim
    assert result.chosen["measured_ms"] == pytest.approx(floor_ms, rel=1e-6)
    with pytest.raises(SlimError, match=f"a latency of {floor_ms * 0.99:.4g} ms .* out of reach"):
        prune_to_budget(  # the goal itself, not the margin, is what the message names
            DEMO, tmp_path / "t.pt", budget_of(latency_ms=floor_ms * 0.99, margin=0.1, table=str(table_path)),
            target=target, log=None,
        )  # fmt: skip
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("margin", [-0.01, 0.5, math.nan, "0.1"])
def test_a_margin_that_is_no_fraction_is_refused(margin):
    with pytest.raises(SlimError, match="`margin`"):
        Budget(speedup=2.0, margin=margin)


def test_or_smallest_prunes_to_the_rails_floor_when_the_goal_is_out_of_reach(tmp_path):
    """What the study uses: a goal the (noisy) table puts out of reach is a missed goal, not a stop."""
    target = WidthTarget()
    with pytest.raises(OutOfReach):
        prune_to_budget(DEMO, tmp_path / "a.pt", budget_of(speedup=50.0, cache=None), target=target, log=None)
    assert not (tmp_path / "a.pt").exists()
    result = prune_to_budget(
        DEMO, tmp_path / "b.pt", budget_of(speedup=50.0, cache=None, or_smallest=True), target=target, log=None
    )
    assert not result.met and any("MISSED" in n for n in result.plan.notes)
    smallest = prune_to_budget(  # the smallest model the rails allow is the fastest one they allow
        DEMO, tmp_path / "c.pt", budget_of(speedup=1.01, cache=None, margin=0.0), target=target, log=None
    )
    assert result.chosen["measured_ms"] < smallest.chosen["measured_ms"]


def test_a_model_far_faster_than_the_goal_is_widened_and_the_try_nearest_the_aim_kept(tmp_path):
    """The machine got faster after profiling: the table over-predicts, the first try meets the goal with
    room to spare (channels given away for nothing), and the loop loosens the budget the same way it
    tightens it; of the tries that meet the goal the one nearest the aim is kept."""
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    prune_to_budget(DEMO, tmp_path / "a.pt", budget_of(speedup=1.5, cache=None), target=target, table_out=table_path,
                    log=None)  # fmt: skip
    full_ms = LatencyTable.from_json(table_path.read_text()).full_ms
    target.load = 0.75
    budget = budget_of(latency_ms=0.6 * full_ms, table=str(table_path), tries=4)
    result = prune_to_budget(DEMO, tmp_path / "slim.pt", budget, target=target, log=None)
    first, chosen = result.tries[0], result.chosen
    assert first["measured_ms"] < first["goal_ms"] * (1 - OVERSHOOT)
    assert len(result.tries) > 1 and result.met
    met = [t for t in result.tries if t["measured_ms"] <= t["goal_ms"] * (1 + MISS_TOLERANCE)]
    aim = 1 - budget.selector.margin
    assert chosen == min(met, key=lambda t: abs(t["measured_ms"] / t["goal_ms"] - aim))
    assert chosen["measured_ms"] > first["measured_ms"]
    assert target.model_ms(tmp_path / "slim.pt") == pytest.approx(chosen["measured_ms"])
    measured = [t["measured_ms"] for t in result.tries]
    assert len(set(measured)) == len(measured)  # no model was measured twice


def test_tries_that_meet_the_goal_are_ranked_by_their_distance_to_the_aim():
    """The kept try: of those within the tolerance of the goal, the one nearest the aim (goal less the
    margin); then the smallest miss."""
    from slim2deploy.pipeline.budget import _rank

    order = [0.97, 0.99, 0.93, 1.0 + MISS_TOLERANCE, 0.80, 1.0 + 2 * MISS_TOLERANCE, 1.5]
    assert sorted(order, key=lambda miss: _rank(miss, 0.97), reverse=True) == order


def test_a_table_timed_by_an_older_method_is_refused(tmp_path):
    """Tables profiled before ONNX Runtime sessions stopped spinning (no 'timing' in their meta) have
    skewed cells; --table refuses them with what to do."""
    target = WidthTarget()
    table_path = tmp_path / "table.json"
    prune_to_budget(DEMO, tmp_path / "a.pt", budget_of(speedup=1.5, cache=None), target=target, table_out=table_path,
                    log=None)  # fmt: skip
    table = LatencyTable.from_json(table_path.read_text())
    assert table.meta["timing"] == TIMING_METHOD
    del table.meta["timing"]
    table_path.write_text(table.to_json())
    with pytest.raises(SlimError, match="timed by an older method .* run 'slim2deploy profile' again"):
        prune_to_budget(DEMO, tmp_path / "b.pt", budget_of(speedup=1.5, table=str(table_path)), target=target, log=None)
    assert not (tmp_path / "b.pt").exists()


def test_the_next_budget_rule_alone():
    """next_step is the closed loop's whole decision, from one try: stop near the aim, else correct the budget
    by measured/predicted (tighten over the goal, widen far under it), by the miss where the table says 0."""
    from dataclasses import replace

    from slim2deploy.pipeline.budget import Try, best_try, next_step

    t = Try(
        counts=(8,), budget_ms=10.0, predicted_ratio=0.5, measured_ms=6.0, baseline_ms=10.0, goal_ms=5.0, factor=1.0
    )
    step = next_step(t, aim=0.97, table_full_ms=20.0)  # measured 0.6 of the baseline where 0.5 was predicted
    assert step.factor == pytest.approx(1.2) and step.budget_ms == pytest.approx(20 * 0.5 / 1.2 * 0.97)
    assert "tightening" in step.why
    assert next_step(replace(t, measured_ms=4.9), 0.97, 20.0).budget_ms is None  # met, near the aim
    wide = next_step(replace(t, measured_ms=3.0), 0.97, 20.0)  # 40% under the goal: widened
    assert wide.budget_ms is not None and wide.budget_ms > t.budget_ms and "widening" in wide.why
    blind = next_step(replace(t, predicted_ratio=0.0), 0.97, 20.0)
    assert blind.budget_ms == pytest.approx(10.0 / 1.2) and blind.factor == 1.0
    tries = [replace(t, measured_ms=m) for m in (5.6, 4.0, 4.8, 5.1)]
    assert best_try(tries, 0.97).measured_ms == 4.8  # of those within the goal, the one nearest the aim


@settings(max_examples=60, deadline=None)
@given(st.floats(0.05, 0.95), st.floats(0.2, 3.0), st.floats(1.0, 100.0), st.floats(0.8, 0.99))
def test_the_corrected_budget_aims_the_corrected_prediction_at_the_aim(ratio, miss, baseline, aim):
    """Whatever the miss, the next budget is the one the corrected table predicts exactly at the aim."""
    from slim2deploy.pipeline.budget import MISS_TOLERANCE, OVERSHOOT, Try, next_step

    goal = baseline * 0.5
    t = Try((8,), 10.0, ratio, goal * miss, baseline, goal, 1.0)
    step = next_step(t, aim, table_full_ms=baseline)
    if aim - OVERSHOOT <= miss <= 1 + MISS_TOLERANCE:
        assert step.budget_ms is None
    else:
        assert step.factor == pytest.approx(goal * miss / baseline / ratio)
        assert step.budget_ms is not None and step.budget_ms * step.factor == pytest.approx(goal * aim)


def test_a_loop_that_cannot_widen_says_when_what_it_leaves_out_is_worth_nothing():
    """A model faster than the goal needs, whose cut channels all have importance 0 (gamma sparse training set to
    0): a wider budget selects it again, and the loop says why instead of only that it stops."""
    from types import SimpleNamespace

    from slim2deploy.pipeline.budget import _why_same
    from slim2deploy.prune.plan import Group

    dead = Group(16, [], list(range(8)), scores=[1.0] * 8 + [0.0] * 8)
    assert "importance 0" in _why_same(SimpleNamespace(groups=[dead, Group(8, [], list(range(8)), scores=[0.5] * 8)]))
    live = Group(16, [], list(range(8)), scores=[1.0] * 8 + [0.0] * 7 + [1e-3])
    assert _why_same(SimpleNamespace(groups=[live])) == ""
    assert _why_same(SimpleNamespace(groups=[Group(8, [], list(range(8)), scores=[0.5] * 8)])) == ""  # nothing cut
