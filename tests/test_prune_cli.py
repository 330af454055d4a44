"""The prune and finetune commands, run as a user runs them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_main
from model_cases import rel_err

from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.stats import count_params
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_main(*args)  # in this process: the command's code without a child's start-up


@pytest.fixture(scope="module")
def sparse_ckpt(make_checkpoint) -> Path:
    """A resnet20 whose zeroed channels (gamma = beta = 0) can be removed without changing outputs."""
    return make_checkpoint("resnet20", width=0.25, num_classes=4, bn_seed=5, sparse_seed=6, meta={"val_acc": 0.5})


@pytest.fixture(scope="module")
def pruned(sparse_ckpt: Path, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("prune")
    out, plan_json = folder / "slim.pt", folder / "plan.json"
    r = _cli(
        "prune", "--model", str(sparse_ckpt), "--ratio", "0.3", "--out", str(out),
        "--round-to", "1", "--min-channels", "1", "--max-prune", "1", "--plan-json", str(plan_json),
    )  # fmt: skip
    return out, plan_json, r


def test_prune_prints_the_table_and_saves_a_checkpoint_that_rebuilds_the_slim_model(
    sparse_ckpt: Path, pruned: tuple[Path, Path, subprocess.CompletedProcess]
) -> None:
    out, plan_json, r = pruned
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "layer1.0.conv1" in r.stdout and "unprunable groups" in r.stdout

    original = model_from_checkpoint(load_checkpoint(sparse_ckpt))
    ckpt = load_checkpoint(out)
    slim = model_from_checkpoint(ckpt)
    assert PruningPlan.from_dict(ckpt.plan) == PruningPlan.from_json(plan_json.read_text())
    assert count_params(slim) < count_params(original)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(original(x), slim(x)) <= 1e-5


def test_prune_refuses_bad_ratios_and_pruned_input(
    sparse_ckpt: Path, pruned: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    out = tmp_path / "slim.pt"
    r = _cli("prune", "--model", str(sparse_ckpt), "--ratio", "1.5", "--out", str(out))
    lines = r.stderr.splitlines()  # a flag refused by argparse is one line too, no usage block above it
    assert r.returncode == 2 and len(lines) == 1 and "error:" in lines[0] and "--ratio" in lines[0]
    assert not out.exists()
    r = _cli("prune", "--model", str(pruned[0]), "--ratio", "0.5", "--out", str(out))
    assert r.returncode == 2 and "already pruned" in r.stderr and not out.exists()


def test_finetune_trains_the_slim_model_and_keeps_its_plan(
    pruned: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    slim, tuned, data = pruned[0], tmp_path / "ft.pt", tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((80, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 4, 80))
    r = _cli(
        "finetune", "--model", str(slim), "--data", str(data), "--epochs", "1", "--batch-size", "16",
        "--out", str(tuned), "--device", "cpu", "--max-drop", "100",  # random labels: no accuracy to keep
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    before, after = load_checkpoint(slim), load_checkpoint(tuned)
    assert after.plan == before.plan
    # trained: every conv and linear weight moved (the BatchNorm running statistics would move without training)
    weights = [k for k, w in before.state_dict.items() if k.endswith("weight") and w.dim() > 1]
    assert weights and all(not torch.equal(before.state_dict[k], after.state_dict[k]) for k in weights)
    model_from_checkpoint(after)


def test_keep_leaves_the_layers_named_whole_and_says_what_it_cost(sparse_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "kept.pt"
    r = _cli("prune", "--model", str(sparse_ckpt), "--ratio", "0.5", "--keep", "layer3.*", "--keep", "conv1",
             "--min-channels", "1", "--round-to", "1", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "keep 'layer3.*', 'conv1'" in r.stdout
    assert re.search(r"without it this selection would have removed [1-9]\d* of them", r.stdout), r.stdout
    plan = PruningPlan.from_dict(load_checkpoint(out).plan)
    kept = [g for g in plan.groups if any(x.startswith("kept whole") for x in g.reasons)]
    assert kept and all(not g.pruned for g in kept)
    assert all(any(m.module.startswith("layer3.") or m.module == "conv1" for m in g.members) for g in kept)
    assert any(g.pruned for g in plan.groups)  # the rest is still pruned
    r = _cli("prune", "--model", str(sparse_ckpt), "--ratio", "0.5", "--keep", "no_such_layer*", "--out", str(out))
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--keep 'no_such_layer*' matches no layer" in lines[0]


def test_the_python_api_offers_what_the_cli_does(sparse_ckpt: Path, tmp_path: Path) -> None:
    import slim2deploy

    for name in ("slim", "export", "load_checkpoint", "model_from_checkpoint", "build", "finetune_checkpoint"):
        assert name in dir(slim2deploy)
    said: list[str] = []
    plan = slim2deploy.slim(sparse_ckpt, tmp_path / "s.pt", ratio=0.3, keep=["conv1"], log=said.append)
    assert plan.removed_channels > 0 and "total" in said[-1]
    reports = slim2deploy.export(tmp_path / "s.pt", tmp_path / "s.onnx", precisions=["fp32", "fp16"])
    assert set(reports) == {"fp32", "fp16"} and (tmp_path / "s.fp16.onnx").exists()
    with pytest.raises(slim2deploy.SlimError, match="`ratio`"):
        slim2deploy.slim(sparse_ckpt, tmp_path / "t.pt", ratio=0.3, speedup=2)
