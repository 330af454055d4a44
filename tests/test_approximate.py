"""--approximate: groups some layer reads raw (a pre-activation ResNet's residual stream) become
prunable, ranked by their BatchNorms' gamma, with the inexactness said in the plan and summary."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import randomize_batchnorm, run_main
from model_cases import rel_err

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.latency import LatencyTable
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import Selection, WidthsSelector, select
from slim2deploy.prune.summary import coverage_lines
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups

ARCH = {"in_channels": 1, "num_classes": 4, "width": 0.5}
RAW = "layer2.0.downsample reads these channels"


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_batchnorm(create_model("resnet20", **ARCH), seed=3), torch.randn(2, 1, 28, 28)


def _stream(plan: PruningPlan) -> int:
    """Index of stage 1's residual stream: the group the stem convolution makes."""
    return next(
        i for i, g in enumerate(plan.groups) if any(m.tensor == "conv1.weight" and m.role == "out" for m in g.members)
    )


def test_exact_tracing_names_the_raw_reader_and_the_flag(resnet) -> None:
    model, x = resnet
    plan = trace_groups(model, x)
    g = plan.groups[_stream(plan)]
    assert not g.prunable and RAW in g.reasons[0] and "`approximate=True`" in g.reasons[0]
    assert plan.exact and not any(g.approximate for g in plan.groups)


def test_approximate_tracing_makes_them_prunable_and_keeps_the_structure(resnet) -> None:
    model, x = resnet
    exact, approx = trace_groups(model, x), trace_groups(model, x, exact=False)
    assert not approx.exact
    assert [(g.size, g.members) for g in exact.groups] == [(g.size, g.members) for g in approx.groups]
    changed = [i for i, (a, b) in enumerate(zip(exact.groups, approx.groups, strict=True)) if a.prunable != b.prunable]
    assert _stream(approx) in changed and len(changed) == 2  # the streams of stages 1 and 2
    for i in changed:
        assert approx.groups[i].prunable and "reads these channels" in approx.groups[i].approximate[0]
    # the model's input and output stay unprunable: no flag makes them prunable
    assert {why for _, why in approx.unprunable()} == {"model input", "model output"}
    assert any(RAW in line for line in coverage_lines(approx))


def test_cutting_the_stream_gives_a_model_that_runs_differs_and_replays(resnet, tmp_path: Path) -> None:
    model, x = resnet
    traced = trace_groups(model, x, exact=False)
    s = _stream(traced)
    widths = tuple(g.size // 2 if i == s else g.size for i, g in enumerate(traced.groups))
    plan = select(traced, Selection(WidthsSelector(widths), Rails(1, 1.0, 1)))
    assert plan.groups[s].pruned and sum(g.pruned for g in plan.groups) == 1
    slim = apply_plan(copy.deepcopy(model), plan)  # the self-check runs: shapes, not outputs
    with torch.no_grad():
        want, got = model(x), slim(x)
    assert got.shape == want.shape and rel_err(want, got) > 1e-3  # inexact by design
    assert slim.conv1.out_channels == widths[s] and slim.layer2[0].downsample.in_channels == widths[s]

    path = tmp_path / "slim.pt"
    save_checkpoint(checkpoint_for(slim, "resnet20", ARCH, (1, 28, 28), 4, plan=plan.to_dict()), path)
    ckpt = load_checkpoint(path)
    assert PruningPlan.from_dict(ckpt.plan) == plan
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(ckpt).eval()(x), got)


def test_a_table_profiled_exact_is_refused_for_approximate_pruning(resnet) -> None:
    model, x = resnet
    exact, approx = trace_groups(model, x), trace_groups(model, x, exact=False)
    steps = [Rails().allowed(g.size) if g.prunable else [] for g in exact.groups]
    table = LatencyTable({"approximate": False}, [g.size for g in exact.groups], steps, [], full_ms=1.0)
    table.check_model([g.size for g in exact.groups], [g.prunable for g in exact.groups])
    with pytest.raises(SlimError, match="profiled without `approximate`"):
        table.check_model([g.size for g in approx.groups], [g.prunable for g in approx.groups])


def test_prune_cli_approximate(resnet, tmp_path: Path) -> None:
    model, x = resnet
    model = copy.deepcopy(model)
    traced = trace_groups(model, x, exact=False)
    s = traced.groups[_stream(traced)]
    with torch.no_grad():  # the first half of the stream unused by every BatchNorm that reads it
        for m in s.members:
            if m.role == "bn":
                model.get_parameter(m.tensor)[m.indices(list(range(s.size // 2)))] = 0
    src = tmp_path / "sparse.pt"
    save_checkpoint(checkpoint_for(model, "resnet20", ARCH, (1, 28, 28), 4), src)

    def prune(*flags: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        out = tmp_path / f"slim{len(flags)}.pt"
        args = [
            "prune",
            "--model",
            str(src),
            "--out",
            str(out),
            "--ratio",
            "0.05",
            "--round-to",
            "1",
            "--min-channels",
            "1",
            *flags,
        ]
        return run_main(*args), out

    r, out = prune("--approximate")
    assert r.returncode == 0, r.stderr
    assert "approximate (--approximate)" in r.stdout and "1 of them cut" in r.stdout
    plan = PruningPlan.from_dict(load_checkpoint(out).plan)
    assert not plan.exact and model_from_checkpoint(load_checkpoint(out)).conv1.out_channels == s.size // 2
    r, out = prune()
    assert r.returncode == 0, r.stderr
    assert model_from_checkpoint(load_checkpoint(out)).conv1.out_channels == s.size  # exact: left whole


def test_the_hint_is_given_only_where_the_flag_helps() -> None:
    """A group without a BatchNorm stays unprunable with --approximate: no hint for it."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 8, 3, padding=1),  # its outputs have no BatchNorm
        torch.nn.Conv2d(8, 4, 3, padding=1),
    ).eval()
    x = torch.randn(1, 1, 8, 8)
    exact, approx = trace_groups(model, x), trace_groups(model, x, exact=False)
    bare = next(g for g in exact.groups if any(m.tensor == "2.weight" and m.role == "out" for m in g.members))
    assert bare.reasons and not any("--approximate" in r for r in bare.reasons)
    assert not next(g for g in approx.groups if g.members == bare.members).prunable


def test_plans_write_the_new_fields_only_when_they_say_something(resnet) -> None:
    """An exact plan has neither field, so it still loads in a slim2deploy older than --approximate."""
    model, x = resnet
    exact = trace_groups(model, x).to_dict()
    assert "exact" not in exact and not any("approximate" in g for g in exact["groups"])
    approx = trace_groups(model, x, exact=False)
    d = approx.to_dict()
    assert d["exact"] is False and sum("approximate" in g and not g["reasons"] for g in d["groups"]) == 2
    assert PruningPlan.from_dict(d) == approx
    lines = "\n".join(coverage_lines(approx))  # nothing cut yet: no claim that the outputs change
    assert "0 of them cut:" in lines and "outputs change" not in lines
