"""bench/gpu.py end to end on the CPU at its smallest settings: real pruning, real ONNX Runtime timing."""

import json

import pytest
import torch
from helpers import run_bench

from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.sparsity import bn_layers, draw_sparse_gammas
from slim2deploy.model.zoo import create_model

ROUND_TO = 64


def run_study(tmp_path, *extra: str):
    args = [
        *("--device", "cpu", "--targets", "ort-cpu", "--models", "mobilenet_v2", "--image-size", "32"),
        *("--batches", "1,4", "--profile-batch", "4", "--speedups", "1.5", "--round-to", str(ROUND_TO)),
        *("--tries", "1", "--iterations", "6", "--rounds", "2", "--warmup-s", "0"),
        *("--work", str(tmp_path / "work"), "--out", str(tmp_path / "gpu.md")),
    ]
    return run_bench("gpu", *args, *extra)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_gammas_put_the_share_near_zero_in_every_layer(seed):
    gen = torch.Generator().manual_seed(seed)
    share = float(torch.rand(1, generator=gen)) * 0.9
    model = draw_sparse_gammas(create_model("resnet20", in_channels=1, width=0.5), share, seed)
    for name, bn in bn_layers(model):
        g = bn.weight.detach()
        small = int((g < 1e-3).sum())
        assert small == int(g.numel() * share), name
        assert bool(((g >= 0.2) & (g <= 1.0)).sum() == g.numel() - small), name
    again = draw_sparse_gammas(create_model("resnet20", in_channels=1, width=0.5), share, seed)
    pairs = zip(bn_layers(model), bn_layers(again), strict=True)
    assert all(torch.equal(a.weight, b.weight) for (_, a), (_, b) in pairs)


@pytest.mark.slow
def test_cpu_smoke_run_writes_json_and_doc_and_resumes(tmp_path):
    first = run_study(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["settings"]["image_size"] == 32 and payload["environment"]["gpu"] is None
    rows = {r["selection"]: r for r in payload["rows"]}
    assert set(rows) == {"speedup 1.5", "ratio 0.5"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["target"] == "ort-cpu" and 0 < row["macs_ratio"] < 1
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0 and row["baseline_ms"] > 0
        assert set(row["batches"]) == {"1", "4"}
        for b in row["batches"].values():
            assert b["timing"] == "end to end"
            assert b["speedup"] == pytest.approx(b["baseline_ms"] / b["slim_ms"])
    assert isinstance(rows["speedup 1.5"]["met"], bool) and rows["speedup 1.5"]["tries"] == 1

    # the ratio model respects the rails: every kept count a multiple of the step or the whole group
    slim = load_checkpoint(tmp_path / "work" / f"mobilenet_v2-32px-ratio0.5-r{ROUND_TO}.pt")
    for g in slim.plan["groups"]:
        assert len(g["keep"]) % ROUND_TO == 0 or len(g["keep"]) == g["size"]

    doc = (tmp_path / "gpu.md").read_text()
    assert "Not a GPU run" in doc and "python bench/gpu.py" in doc
    lines = doc.splitlines()
    header = lines.index("## ort-cpu") + 2
    assert lines[header].startswith("| model | selection | MACs ratio | predicted ms | measured ms")
    table = [ln for ln in lines[header + 2 :] if ln.startswith("| mobilenet_v2 |")]
    assert [ln.split(" | ")[1].split(" (")[0] for ln in table] == ["speedup 1.5", "ratio 0.5"]
    for ln, sel in zip(table, ("speedup 1.5", "ratio 0.5"), strict=True):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 8
        assert float(cells[2]) == pytest.approx(rows[sel]["macs_ratio"], abs=1e-3)
        assert cells[-1] == f"{rows[sel]['batches']['4']['speedup']:.2f}x"

    # run again: every row is finished, so nothing is pruned or timed and the rows stay as they were
    again = run_study(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("skipped") == 2 and "benchmark" not in again.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == payload["rows"]

    # other settings into the same file: one error line, the file untouched
    other = run_study(tmp_path, "--image-size", "48")
    assert other.returncode == 2
    assert other.stderr.strip().startswith("error:") and len(other.stderr.strip().splitlines()) == 1
    assert "other settings" in other.stderr
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == payload["rows"]
