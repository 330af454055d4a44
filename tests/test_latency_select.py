"""The latency table as data, the exact knapsack and the latency selector (no model, no timing)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.knapsack import solve_mckp, staircase
from slim2deploy.prune.latency import BranchSpec, LatencyTable, LayerSpec
from slim2deploy.prune.latency_solve import OutOfReach
from slim2deploy.prune.plan import Group
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.select import LatencySelector, Selection

eighths = st.integers(0, 80).map(lambda n: n / 8)  # exact in binary: sums do not depend on their order
options = st.lists(st.tuples(eighths, st.floats(0, 10, allow_nan=False)), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(options, min_size=1, max_size=5), st.integers(0, 240).map(lambda n: n / 8))
def test_knapsack_matches_brute_force(choices, budget):
    picked = solve_mckp(choices, budget)
    feasible = [
        sum(choices[g][j][1] for g, j in enumerate(combo))
        for combo in itertools.product(*[range(len(o)) for o in choices])
        if sum(choices[g][j][0] for g, j in enumerate(combo)) <= budget
    ]
    if not feasible:
        assert picked is None
        return
    assert picked is not None
    assert sum(choices[g][j][0] for g, j in enumerate(picked)) <= budget + 1e-9
    assert sum(choices[g][j][1] for g, j in enumerate(picked)) == pytest.approx(max(feasible), abs=1e-9)


def test_staircase_keeps_the_larger_count_at_equal_cost():
    # 40 and 48 cost the same (within noise): 48 is kept, 40 dropped; 8 -> 16 is a real step
    steps = staircase([8, 16, 24, 32, 40, 48], [1.0, 2.0, 2.0, 3.0, 4.02, 4.0], tol=0.03)
    assert steps == [(8, 1.0), (24, 2.0), (32, 3.0), (48, 4.0)]
    # a wider layer measured faster: the narrower one may not cost more than it
    assert staircase([8, 16], [2.0, 1.0], tol=0.0) == [(16, 1.0)]


def _additive_table(sizes, steps, costs, base=0.5):
    """Each group's cost lives in one layer that only it changes: latency is additive over groups."""
    layers = []
    for g, (size, curve) in enumerate(zip(sizes, costs, strict=True)):
        layer = LayerSpec(name=f"conv{g}", op="conv", in_fixed=3, in_groups=[], out_fixed=size, out_group=g)
        for k, ms in zip(steps[g], curve, strict=True):
            layer.record(3, k, ms)
        layers.append(layer)
    table = LatencyTable({"target": "test", "batch": 1}, list(sizes), [list(s) for s in steps], layers, 0.0)
    table.calibrate(base + sum(c[-1] for c in costs))
    return table


@st.composite
def additive_cases(draw):
    n = draw(st.integers(1, 4))
    sizes, steps, costs, scores = [], [], [], []
    for _ in range(n):
        size = draw(st.sampled_from([8, 16, 24, 32]))
        ks = list(range(8, size + 1, 8)) if size > 8 else [4, 8]
        rises = draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0]), min_size=len(ks), max_size=len(ks)))
        sizes.append(size)
        steps.append(ks)
        costs.append(list(itertools.accumulate(r + 0.01 for r in rises)))
        scores.append(draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=size, max_size=size)))
    speedup = draw(st.floats(1.0, 3.0))
    return sizes, steps, costs, scores, speedup


@settings(max_examples=150, deadline=None)
@given(additive_cases())
@example(([8], [[4, 8]], [[0.01, 0.02]], [[0.0] * 3 + [1.0] * 5], 1.0000000000000002))  # budget a hair below full
def test_latency_selector_matches_brute_force(case):
    sizes, steps, costs, scores, speedup = case
    table = _additive_table(sizes, steps, costs)
    groups = [Group(size, [], list(range(size)), scores=s) for size, s in zip(sizes, scores, strict=True)]
    rails = Rails(min_channels=1, max_prune=1.0, round_to=4)
    selector = LatencySelector(table.to_dict(), speedup=speedup, tolerance=0.0)
    budget = table.full_ms / speedup

    def value(counts):
        return sum(sum(sorted(s, reverse=True)[:k]) for s, k in zip(scores, counts, strict=True))

    feasible = [value(c) for c in itertools.product(*steps) if table.predict(c) <= budget + 1e-9]
    if not feasible:
        with pytest.raises(SlimError, match="out of reach"):
            selector.kept_counts(groups, rails)
        return
    counts, facts = selector.kept_counts(groups, rails)
    assert all(k in s for k, s in zip(counts, steps, strict=True))
    assert facts["predicted_ms"] == pytest.approx(table.predict(counts))
    assert table.predict(counts) <= budget + 1e-9
    assert value(counts) == pytest.approx(max(feasible), abs=1e-9)


def test_rails_still_apply_to_a_latency_selection():
    table = _additive_table([32, 32], [[8, 16, 24, 32]] * 2, [[1, 2, 3, 4], [1, 2, 3, 4]])
    groups = [Group(32, [], list(range(32)), scores=[0.0] * 32) for _ in range(2)]
    counts, _ = LatencySelector(table.to_dict(), speedup=1.8).kept_counts(groups, Rails(min_channels=16))
    assert min(counts) >= 16


def test_a_budget_with_room_to_spare_keeps_no_channel_of_zero_importance():
    """Channels whose gamma sparse training set to 0 add nothing; a budget that could pay for them does not
    keep them (the model is then faster than asked), while channels that carry importance are spent on."""
    table = _additive_table([32, 32], [[8, 16, 24, 32]] * 2, [[1, 2, 3, 4], [1, 2, 3, 4]])
    dead_half = [1.0] * 16 + [0.0] * 16
    groups = [Group(32, [], list(range(32)), scores=dead_half), Group(32, [], list(range(32)), scores=[0.5] * 32)]
    counts, facts = LatencySelector(table.to_dict(), speedup=1.05).kept_counts(groups, Rails(min_channels=8))
    assert counts == [16, 32]  # the live half of the first group, every channel of the second
    assert facts["predicted_ms"] < table.full_ms / 1.05 - 1.0  # a whole step under the budget, left unspent


def test_unreachable_budget_is_one_line_with_the_best_speedup():
    table = _additive_table([16], [[8, 16]], [[2.0, 3.0]], base=1.0)  # full 4 ms, at best 3 ms
    groups = [Group(16, [], list(range(16)), scores=[1.0] * 16)]
    with pytest.raises(SlimError) as err:
        LatencySelector(table.to_dict(), speedup=2.0).kept_counts(groups, Rails(min_channels=1))
    msg = str(err.value)
    assert "\n" not in msg and "out of reach" in msg and "1.33x" in msg


def test_budget_must_be_one_positive_number():
    table = _additive_table([16], [[8, 16]], [[2.0, 3.0]]).to_dict()
    for kwargs in ({}, {"speedup": 2.0, "latency_ms": 1.0}, {"speedup": -1.0}, {"latency_ms": 0}):
        with pytest.raises(SlimError):
            LatencySelector(table, **kwargs)


def test_table_round_trip_and_selection_round_trip():
    table = _additive_table([16, 24], [[8, 16], [8, 16, 24]], [[1.0, 2.0], [0.5, 0.6, 0.9]])
    table.layers.append(LayerSpec("fc", "linear", 0, [[0, 4], [1, 4]], 10, None, cells={"160,10": 0.2, "64,10": 0.1}))
    again = LatencyTable.from_json(table.to_json())
    assert again == table
    for counts in itertools.product([8, 16], [8, 16, 24]):
        assert again.predict(counts) == pytest.approx(table.predict(counts))
    assert {g: [k for k, _ in s] for g, s in again.staircases(tol=0.0).items()} == {0: [8, 16], 1: [8, 16, 24]}
    selection = Selection(LatencySelector(table.to_dict(), latency_ms=3.0), Rails(min_channels=1))
    assert Selection.from_dict(selection.to_dict()) == selection
    with pytest.raises(SlimError, match="not a slim2deploy latency table"):
        LatencyTable.from_json('{"version": 99}')


def test_rank1_estimate_is_exact_on_measured_lines_and_separable_between():
    layer = LayerSpec("conv", "conv", 0, [[0, 1]], 0, 1)
    f = {ci: ci / 8 for ci in (8, 16, 32)}
    g = {co: co / 4 for co in (8, 16, 32)}
    for ci in f:  # the column at co=32 and the row at ci=32
        layer.record(ci, 32, f[ci] * g[32])
        layer.record(32, ci, f[32] * g[ci])
    for ci, co in itertools.product(f, g):
        assert layer.ms(ci, co) == pytest.approx(f[ci] * g[co])


def test_table_solver_and_targets_import_without_torch():
    """A GPU box with only numpy + a runtime can read tables, solve and time targets."""
    import subprocess
    import sys

    code = (
        "import sys; import slim2deploy.prune.latency, slim2deploy.prune.knapsack, slim2deploy.measure.targets; "
        "import slim2deploy.prune.latency_solve; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


@st.composite
def chain_cases(draw):
    """A plain chain (VGG-like): layer g reads group g-1 and writes group g, cost ~ c_in * c_out."""
    n = draw(st.integers(2, 3))
    sizes = [draw(st.sampled_from([16, 24, 32])) for _ in range(n)]
    scores = [draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=s, max_size=s)) for s in sizes]
    return sizes, scores, draw(st.floats(1.2, 3.0))


@settings(max_examples=60, deadline=None)
@given(chain_cases())
def test_latency_selector_on_a_chain_stays_within_budget_and_near_brute_force(case):
    sizes, scores, speedup = case
    steps = [list(range(8, s + 1, 8)) for s in sizes]
    layers = []
    for g in range(len(sizes)):
        layer = LayerSpec(f"conv{g}", "conv", 3 if g == 0 else 0, [] if g == 0 else [[g - 1, 1]], 0, g)
        for ci in [3] if g == 0 else steps[g - 1]:
            for co in steps[g]:
                layer.record(ci, co, 0.01 * math.ceil(ci / 8) * math.ceil(co / 8))
        layers.append(layer)
    table = LatencyTable({"target": "test"}, sizes, steps, layers, 0.0)
    table.calibrate(0.1 + table.predict(sizes))
    groups = [Group(s, [], list(range(s)), scores=sc) for s, sc in zip(sizes, scores, strict=True)]
    budget = table.full_ms / speedup

    def value(counts):
        return sum(sum(sorted(s, reverse=True)[:k]) for s, k in zip(scores, counts, strict=True))

    feasible = [value(c) for c in itertools.product(*steps) if table.predict(c) <= budget + 1e-9]
    selector = LatencySelector(table.to_dict(), speedup=speedup, tolerance=0.0)
    if not feasible:
        with pytest.raises(SlimError):
            selector.kept_counts(groups, Rails(min_channels=1))
        return
    counts, _ = selector.kept_counts(groups, Rails(min_channels=1))
    assert table.predict(counts) <= budget + 1e-9
    assert value(counts) >= 0.9 * max(feasible) - 1e-9


def _valid_table() -> LatencyTable:
    table = _additive_table([16, 24], [[8, 16], [8, 16, 24]], [[1.0, 2.0], [0.5, 0.6, 0.9]])
    table.layers[0].kernel, table.layers[0].stride, table.layers[0].padding = [3, 3], [1, 1], [1, 1]
    table.layers[0].dilation, table.layers[0].in_hw = [1, 1], [8, 8]
    table.layers.append(LayerSpec("fc", "linear", 0, [[0, 4], [1, 4]], 10, None, cells={"160,10": 0.2}))
    table.calibrate(table.full_ms, small_ms=table.full_ms / 2, small=[8, 8])
    return table


def _set(*path, value=None, delete=False):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        if delete:
            del d[path[-1]]
        else:
            d[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_set("layers", 0, "cells", value={"a,b": 1.0}), "layers[0].cells"),
        (_set("layers", 0, "cells", "3,8", value="fast"), "layers[0].cells['3,8']"),
        (_set("layers", 0, "cells", "3,8", value=math.nan), "layers[0].cells['3,8']"),
        (_set("layers", 0, "cells", "3,8", value=math.inf), "layers[0].cells['3,8']"),
        (_set("layers", 0, "cells", "3,8", value=-1.0), "layers[0].cells['3,8']"),
        (_set("layers", 0, "cells", value={"0,8": 1.0}), "layers[0].cells"),
        (_set("layers", 0, "out_group", value=99), "layers[0].out_group"),
        (_set("layers", 2, "in_groups", value=[[0, 4], [2, 4]]), "layers[2].in_groups[1]"),
        (_set("layers", 2, "in_groups", value=[[0, 0]]), "layers[2].in_groups[0]"),
        (_set("layers", 0, "op", value="pool"), "layers[0].op"),
        (_set("layers", 0, "kernel", value=[-3, 3]), "layers[0].kernel[0]"),
        (_set("layers", 0, "stride", value=[1, 0]), "layers[0].stride[1]"),
        (_set("layers", 0, "padding", value=[-1, 1]), "layers[0].padding[0]"),
        (_set("layers", 0, "in_fixed", value=-3), "layers[0].in_fixed"),
        (_set("layers", 2, "out_fixed", value=1.5), "layers[2].out_fixed"),
        (_set("layers", 0, "name", delete=True), "layers[0].name"),
        (_set("layers", 0, "speed", value=1), "layers[0].speed"),
        (_set("scale", value=-1.0), "scale"),
        (_set("scale", value=0), "scale"),
        (_set("scale", value=math.nan), "scale"),
        (_set("base_ms", value=-100.0), "base_ms"),
        (_set("base_ms", value=math.inf), "base_ms"),
        (_set("full_ms", value=0.0), "full_ms"),
        (_set("full_ms", value="4 ms"), "full_ms"),
        (_set("sizes", value=[0, 24]), "sizes[0]"),
        (_set("steps", delete=True), "steps is missing"),
        (_set("steps", value=[[8, 16]]), "steps"),
        (_set("steps", 0, value=[-8, 16]), "steps[0]"),
        (_set("steps", 0, value=[8, 32]), "steps[0]"),
        (_set("steps", 1, value=[16, 8]), "steps[1]"),
        (_set("meta", value=[]), "meta"),
    ],
)
def test_an_edited_table_is_one_error_naming_the_field(edit, named):
    d = _valid_table().to_dict()
    edit(d)
    with pytest.raises(SlimError) as err:
        LatencyTable.from_json(json.dumps(d))
    msg = str(err.value)
    assert named in msg and "profile the model again" in msg and "\n" not in msg, msg


def test_a_valid_table_still_round_trips_and_a_non_mapping_says_so():
    table = _valid_table()
    table.base_ms = -0.1  # as calibration fitted before it kept the base at 0 or above: still a valid table
    assert LatencyTable.from_json(table.to_json()) == table
    with pytest.raises(SlimError, match="a JSON list, expected a mapping"):
        LatencyTable.from_json(json.dumps([table.to_dict()]))


def test_rails_that_allow_no_speedup_say_so_instead_of_a_speedup_below_one():
    table = _additive_table([16], [[8, 16]], [[3.0, 2.0]])  # the narrower layer measures slower
    groups = [Group(16, [], list(range(16)), scores=[1.0] * 16)]
    with pytest.raises(SlimError) as err:
        LatencySelector(table.to_dict(), speedup=1.1).kept_counts(groups, Rails(min_channels=1))
    msg = str(err.value)
    assert "no speed-up" in msg and "`round_to`" in msg and "ask for at most" not in msg and "0." not in msg, msg


# --- depth: tables that price removing residual branches ------------------------------------------------------


def _branch_table(sizes, steps, costs, branches, extras, base=None, fixed=()):
    """An additive table (each layer's widths set by one group) whose ``branches`` (lists of groups) each also
    hold a layer no group changes (its cost in ``fixed``, 0 for none) and save ``extras`` more when removed."""
    base = 0.5 + sum(extras) if base is None else base  # the model without branches still takes time
    table = _additive_table(sizes, steps, costs, base)
    for b, (groups, extra) in enumerate(zip(branches, extras, strict=True)):
        layers = list(groups)  # _additive_table: layer g is group g's
        if fixed and fixed[b]:
            table.layers.append(LayerSpec(f"se{b}", "conv", 8, [], 8, None, cells={"8,8": fixed[b]}))
            layers.append(len(table.layers) - 1)
        table.branches.append(BranchSpec(f"add{b}", list(groups), layers, 64, extra))
    table.depth = True
    table.calibrate(base + sum(c[-1] for c in costs) + sum(fixed))
    return table


def _value(scores, counts, table):
    gone = {g for b in table.removed(counts) for g in b.groups}
    return sum(
        sum(sorted(s, reverse=True)[:k]) for i, (s, k) in enumerate(zip(scores, counts, strict=True)) if i not in gone
    )


def test_predict_with_a_removed_branch_drops_its_layers_and_its_extra():
    table = _branch_table([16, 16, 8], [[8, 16], [8, 16], [8]], [[1.0, 2.0], [0.5, 1.0], [0.3]], [[0, 1]], [0.25],
                          fixed=[0.4])  # fmt: skip
    full = table.predict([16, 16, 8])
    assert full == pytest.approx(table.full_ms)
    # group 0 emptied: its branch goes (groups 0 and 1, their layers and the fixed one), and 0.25 ms more
    gone = table.predict([0, 16, 8])
    assert gone == pytest.approx(table.base_ms + 0.3 - 0.25)
    assert table.predict([16, 0, 8]) == gone == table.predict([0, 8, 8])  # whichever group, whatever the other
    assert [b.join for b in table.removed([0, 16, 8])] == ["add0"] and not table.removed([8, 8, 8])
    for layer in table.layers:  # a width of 0 is never a cell: none was looked up or estimated
        assert all(0 not in key for key in (*layer.measured(), *layer._estimated))
    assert table.lines_around([0, 16, 8]) == []  # nothing to profile for a branch that is gone


def test_a_table_with_branches_round_trips_and_old_tables_have_no_depth():
    table = _branch_table([16, 24], [[8, 16], [8, 16, 24]], [[1.0, 2.0], [0.5, 0.6, 0.9]], [[0]], [-0.1], fixed=[0.2])
    again = LatencyTable.from_json(table.to_json())
    assert again == table and again.depth and again.branches[0].layers == [0, 2]
    for counts in itertools.product([0, 8, 16], [8, 16, 24]):
        assert again.predict(counts) == pytest.approx(table.predict(counts))
    old = table.to_dict()
    del old["depth"], old["branches"]  # as written before depth
    assert not LatencyTable.from_dict(old).depth and LatencyTable.from_dict(old).branches == []


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_set("depth", value="yes"), "depth"),
        (_set("depth", value=False), "branches"),
        (_set("branches", value={}), "branches"),
        (_set("branches", 0, value=[]), "branches[0]"),
        (_set("branches", 0, "groups", value=[]), "branches[0].groups"),
        (_set("branches", 0, "groups", value=[7]), "branches[0].groups"),
        (_set("branches", 0, "groups", value=[0, 0]), "branches[0].groups"),
        (_set("branches", 1, "groups", value=[0]), "branches[1].groups"),
        (_set("branches", 0, "layers", value=[9]), "branches[0].layers"),
        (_set("branches", 1, "layers", value=[0]), "branches[1].layers"),
        (_set("branches", 0, "size", value=0), "branches[0].size"),
        (_set("branches", 0, "extra_ms", value=math.nan), "branches[0].extra_ms"),
        (_set("branches", 0, "extra_ms", value=1e9), "base_ms"),  # the smallest model would take no time
        (_set("branches", 0, "join", value=3), "branches[0].join"),
        (_set("branches", 0, "speed", value=1), "branches[0].speed"),
        (_set("branches", 0, "layers", delete=True), "branches[0].layers"),
    ],
)
def test_an_edited_branch_record_is_one_error_naming_the_field(edit, named):
    table = _branch_table([16, 24, 8], [[8, 16], [8, 16, 24], [8]], [[1.0, 2.0], [0.5, 0.6, 0.9], [0.2]], [[0], [1]],
                          [0.1, 0.1])  # fmt: skip
    d = table.to_dict()
    edit(d)
    with pytest.raises(SlimError) as err:
        LatencyTable.from_json(json.dumps(d))
    msg = str(err.value)
    assert named in msg and "profile the model again" in msg and "\n" not in msg, msg


def test_calibrate_depth_predicts_the_model_without_branches_and_shares_by_join_size():
    table = _branch_table([16, 16, 8], [[8, 16], [8, 16], [8]], [[1.0, 2.0], [0.5, 1.0], [0.3]], [[0], [1]], [0, 0])
    table.branches[1].size = 3 * table.branches[0].size
    bare = [0, 0, 8]
    table.calibrate_depth(0.5, bare)
    assert table.predict(bare) == pytest.approx(0.5)
    unexplained = table.base_ms + 0.3 - 0.5
    assert [b.extra_ms for b in table.branches] == pytest.approx([unexplained / 4, 3 * unexplained / 4])
    # measured slower than the layers explain (standalone probes overpricing tiny layers): removing a branch
    # still saves at least nothing, even at its narrowest
    table.calibrate_depth(5.0, bare)
    narrowest = [8, 8, 8]
    assert [b.extra_ms for b in table.branches] == pytest.approx([-1.0, -0.5])  # its layer's cost at 8 channels
    for b in table.branches:
        kept = table.predict(narrowest)
        assert table.predict([0 if g in b.groups else k for g, k in enumerate(narrowest)]) <= kept + 1e-12


def test_a_refined_table_is_fitted_again_to_its_measured_anchors():
    """Cells timed after the fit (a refined line) change what the layers explain of the measured models; the
    table is fitted again so it still predicts them (a stale fit predicted a negative time on a loaded host)."""
    table = _branch_table([16, 16, 8], [[8, 16], [8, 16], [8]], [[1.0, 2.0], [0.5, 1.0], [0.3]], [[0]], [0.0])
    small, bare = table.anchors()
    assert small == [8, 8, 8] and bare == [0, 8, 8]
    table.small_ms, table.bare_ms = 2.3, 1.0
    table.recalibrate()
    fitted = [table.predict(c) for c in (table.sizes, small, bare)]
    assert fitted == pytest.approx([table.full_ms, 2.3, 1.0])
    table.layers[0].record(3, 8, 0.4)  # the narrow cells timed again, far cheaper than before
    table.layers[1].record(3, 8, 0.2)
    assert table.predict(small) != pytest.approx(2.3)
    table.recalibrate()
    assert [table.predict(c) for c in (table.sizes, small, bare)] == pytest.approx(fitted)
    again = LatencyTable.from_json(table.to_json())
    assert (again.small_ms, again.bare_ms) == (2.3, 1.0) and again.predict(bare) == pytest.approx(1.0)
    old = table.to_dict()
    del old["small_ms"], old["bare_ms"]  # a table from before the anchors were kept: its fit stands
    kept = LatencyTable.from_dict(old)
    kept.recalibrate()
    assert (kept.base_ms, kept.scale) == (table.base_ms, table.scale)


def test_a_fit_that_would_give_the_rest_of_the_model_negative_time_keeps_it_at_zero():
    """Model timings that disagree with the cells (taken under another load) fit a line whose intercept is
    below zero; then the unpruned model stays exact, nothing is outside the layers, and every model the table
    was anchored on is still predicted to take time (the table is accepted)."""
    table = _branch_table([16, 16, 8], [[8, 16], [8, 16], [8]], [[1.0, 2.0], [0.5, 1.0], [0.3]], [[0]], [0.0])
    small, bare = table.anchors()
    table.small_ms, table.bare_ms = 0.2, 0.05  # far faster than the cells say the small model can be
    table.recalibrate()
    assert table.base_ms == 0 and table.predict(table.sizes) == pytest.approx(table.full_ms)
    assert table.predict(small) > 0 and table.predict(bare) > 0
    assert LatencyTable.from_json(table.to_json()).predict(bare) == pytest.approx(table.predict(bare))


def _groups(sizes, scores):
    return [Group(size, [], list(range(size)), scores=s) for size, s in zip(sizes, scores, strict=True)]


def test_the_knapsack_removes_a_dead_branch_to_reach_the_budget_and_keeps_a_live_one():
    # group 0 is a branch (2 ms at 16, 1 ms at 8); group 1 a plain layer (2 ms at 16, 1 ms at 8)
    table = _branch_table([16, 16], [[8, 16], [8, 16]], [[1.0, 2.0], [1.0, 2.0]], [[0]], [0.5], base=0.5)
    budget = 2.0  # full 4.5 ms: narrowing both (2.5) is not enough, removing the branch (2.0) is
    dead, live = [0.0] * 16, [1.0] * 16
    counts, facts = LatencySelector(table.to_dict(), latency_ms=budget).kept_counts(
        _groups([16, 16], [dead, live]), Rails(min_channels=1), removable={0}
    )
    assert counts == [0, 16] and facts["predicted_ms"] <= budget
    # a branch whose channels matter is narrowed when that reaches the budget, not removed
    counts, _ = LatencySelector(table.to_dict(), latency_ms=3.0).kept_counts(
        _groups([16, 16], [live, [0.1] * 16]), Rails(min_channels=1), removable={0}
    )
    assert counts[0] > 0
    # without depth (no removable group) the same budget is out of reach, and says so
    with pytest.raises(OutOfReach, match="`depth=True`"):
        LatencySelector(table.to_dict(), latency_ms=budget).kept_counts(
            _groups([16, 16], [dead, live]), Rails(min_channels=1)
        )
    with pytest.raises(OutOfReach, match=r"\(1 of its 1 removable residual branches removed\)"):
        LatencySelector(table.to_dict(), latency_ms=0.5).kept_counts(
            _groups([16, 16], [dead, live]), Rails(min_channels=1), removable={0}
        )


def test_a_table_without_depth_is_refused_only_where_a_branch_may_go():
    table = _additive_table([16, 16], [[8, 16], [8, 16]], [[1.0, 2.0], [1.0, 2.0]])
    groups = _groups([16, 16], [[1.0] * 16] * 2)
    with pytest.raises(SlimError, match="profiled without depth.*`depth=False`") as err:
        LatencySelector(table.to_dict(), speedup=1.2).kept_counts(groups, Rails(min_channels=1), removable={0})
    assert "\n" not in str(err.value)
    LatencySelector(table.to_dict(), speedup=1.2).kept_counts(groups, Rails(min_channels=1))  # width only: fine
    priced = _branch_table([16, 16], [[8, 16], [8, 16]], [[1.0, 2.0], [1.0, 2.0]], [[0]], [0.5])
    counts, _ = LatencySelector(priced.to_dict(), speedup=1.2).kept_counts(groups, Rails(min_channels=1))
    assert all(counts)  # a table with depth, pruning without: nothing is removed


@st.composite
def branch_cases(draw):
    """Additive tables with branches of one or two groups (at least one), some holding a layer no group changes."""
    sizes, steps, costs, scores, speedup = draw(additive_cases())
    n = len(sizes)
    order = draw(st.permutations(range(n)))
    branches, cut = [], 0
    for _ in range(draw(st.integers(1, n))):
        if cut < n:
            width = draw(st.integers(1, min(2, n - cut)))
            branches.append(sorted(order[cut : cut + width]))
            cut += width
    extras = [draw(st.sampled_from([-0.1, 0.0, 0.5, 1.0])) for _ in branches]  # what a removal saves more
    fixed = [draw(st.sampled_from([0.0, 0.3])) for _ in branches]
    weight = [draw(st.sampled_from([0.0, 0.05, 1.0])) for _ in range(n)]  # dead, weak or live channels
    scores = [[w * v for v in s] for s, w in zip(scores, weight, strict=True)]
    return sizes, steps, costs, scores, speedup * draw(st.sampled_from([1.0, 1.5, 2.5])), branches, extras, fixed


@settings(max_examples=150, deadline=None)
@given(branch_cases())
def test_latency_selector_with_branches_matches_brute_force(case):
    sizes, steps, costs, scores, speedup, branches, extras, fixed = case
    table = _branch_table(sizes, steps, costs, branches, extras, fixed=fixed)
    groups = _groups(sizes, scores)
    removable = {g for b in branches for g in b}
    selector = LatencySelector(table.to_dict(), speedup=speedup, tolerance=0.0)
    budget = table.full_ms / speedup
    choices = [[0, *s] if i in removable else s for i, s in enumerate(steps)]
    feasible = [_value(scores, c, table) for c in itertools.product(*choices) if table.predict(c) <= budget + 1e-9]
    if not feasible:
        with pytest.raises(OutOfReach):
            selector.kept_counts(groups, Rails(min_channels=1, max_prune=1.0, round_to=4), removable)
        return
    counts, facts = selector.kept_counts(groups, Rails(min_channels=1, max_prune=1.0, round_to=4), removable)
    assert facts["predicted_ms"] == pytest.approx(table.predict(counts)) and table.predict(counts) <= budget + 1e-9
    assert _value(scores, counts, table) == pytest.approx(max(feasible), abs=1e-9)
    for b in table.removed(counts):  # one group emptied, the others of the branch whole
        assert sorted(counts[g] for g in b.groups)[1:] == sorted(sizes[g] for g in b.groups if counts[g])


@st.composite
def bottleneck_cases(draw):
    """A bottleneck branch (conv1 -> G0, conv2 G0 -> G1, conv3 G1 -> the stream) next to a plain layer (G2):
    conv2's cost depends on both of the branch's groups, so latency is not additive there."""
    sizes = [draw(st.sampled_from([16, 24])) for _ in range(3)]
    weights = [draw(st.sampled_from([0.0, 0.1, 1.0])) for _ in range(3)]
    scores = [[w * draw(st.floats(0, 1)) for _ in range(s)] for s, w in zip(sizes, weights, strict=True)]
    return sizes, scores, draw(st.floats(1.2, 4.0)), draw(st.sampled_from([0.0, 0.05]))


@settings(max_examples=60, deadline=None)
@given(bottleneck_cases())
def test_latency_selector_with_a_bottleneck_branch_stays_within_budget_and_near_brute_force(case):
    sizes, scores, speedup, extra = case
    steps = [list(range(8, s + 1, 8)) for s in sizes]
    wiring = [("conv1", 16, [], 0), ("conv2", 0, [[0, 1]], 1), ("conv3", 0, [[1, 1]], None), ("fc", 16, [], 2)]
    layers = []
    for name, fixed_in, ins, out in wiring:
        layer = LayerSpec(name, "conv", fixed_in, ins, 16 if out is None else 0, out)
        for ci in steps[ins[0][0]] if ins else [fixed_in]:
            for co in [16] if out is None else steps[out]:
                layer.record(ci, co, 0.01 * math.ceil(ci / 8) * math.ceil(co / 8))
        layers.append(layer)
    table = LatencyTable({"target": "test"}, sizes, steps, layers, 0.0, depth=True)
    table.branches = [BranchSpec("add", [0, 1], [0, 1, 2], 256, extra)]
    table.calibrate(0.1 + extra + table.predict(sizes))
    budget = table.full_ms / speedup
    choices = [[0, *steps[0]], [0, *steps[1]], steps[2]]
    feasible = [_value(scores, c, table) for c in itertools.product(*choices) if table.predict(c) <= budget + 1e-9]
    selector = LatencySelector(table.to_dict(), speedup=speedup, tolerance=0.0)
    groups = _groups(sizes, scores)
    if not feasible:
        with pytest.raises(OutOfReach):
            selector.kept_counts(groups, Rails(min_channels=1), removable={0, 1})
        return
    counts, _ = selector.kept_counts(groups, Rails(min_channels=1), removable={0, 1})
    assert table.predict(counts) <= budget + 1e-9
    assert _value(scores, counts, table) >= 0.9 * max(feasible) - 1e-9
