"""bench/study.py end to end at a toy size: it trains, prunes, exports, times and writes both reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import bench_on_path, run_bench


@pytest.mark.slow
def test_study_smoke_writes_markdown_and_json(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "results.md"
    proc = run_bench("study", "--smoke", "--threads", "2", "--out", out, "--work", tmp_path / "work")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    md = out.read_text()

    for column in ("γ<1e-2 %", "acc pruned %", "acc final %", "params", "MACs", "ONNX KB", "b1 ms", "b64 ms"):
        assert column in md
    for column in ("b1 speed-up", "b64 eff.", "fp16 %", "int8 %"):
        assert column in md
    assert "torch " in md and "onnxruntime " in md and "numpy " in md

    (result,) = report["results"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "sparse", "slim", "own-gamma", "scratch"}
    base, slim = rows["baseline"], rows["slim"]
    for r in rows.values():
        assert 0.0 <= r["acc"] <= 1.0
        assert r["params"] > 0 and r["macs"] > 0
    assert slim["macs"] < base["macs"] and slim["params"] < base["params"]
    # the controls are built at the slim model's widths, so they cost exactly the same
    assert rows["own-gamma"]["macs"] == rows["scratch"]["macs"] == slim["macs"]
    assert 0.0 <= slim["acc_pruned"] <= 1.0 and 0.0 <= slim["small_gamma"] <= 1.0
    for r in (base, slim, rows["own-gamma"], rows["scratch"]):
        assert r["onnx_bytes"] > 0
        assert 0.0 <= r["fp16_acc"] <= 1.0 and 0.0 <= r["int8_acc"] <= 1.0
        assert abs(r["fp16_acc"] - r["acc"]) <= 0.02  # fp16 of the same weights barely moves top-1
    for b in ("1", "64"):
        assert base["latency_ms"][b] > 0 and slim["latency_ms"][b] > 0
        assert math.isclose(slim["speedup"][b], base["latency_ms"][b] / slim["latency_ms"][b], rel_tol=1e-2)
    assert {t["target"] for t in report["targets"]["vgg11"]} >= {"≥ 40% fewer MACs"}
    assert report["environment"]["torch"] and report["environment"]["onnxruntime"]

    # the latency-matched comparison (on by default in smoke mode): its table and its rows
    assert "Latency-matched comparison" in md
    for column in ("acc before FT %", "acc after FT %", "predicted ms", "measured ms", "speed-up"):
        assert column in md
    study = result["latency_study"]
    lat = {r["variant"]: r for r in study["rows"]}
    variants = ["latency", "gamma", "uniform", "scratch"]
    assert list(lat) == ["baseline", *(f"{v}{kd}" for v in variants for kd in ("", "+kd"))]
    for name in (r for r in lat if r != "baseline"):
        r = lat[name]
        assert 0.0 <= r["acc_before"] <= 1.0 and 0.0 <= r["acc"] <= 1.0
        assert 0 < r["macs"] < lat["baseline"]["macs"] and r["measured_ms"] > 0
        assert math.isclose(r["speedup"], lat["baseline"]["measured_ms"] / r["measured_ms"], rel_tol=1e-2)
        assert r["epochs"] == lat["latency"]["epochs"]  # the same total training for all three
    # the two controls were matched to the latency-targeted model by timing them against it
    for search in (study["gamma_search"], study["uniform_search"]):
        assert search["trials"] and search["relative"] == min(
            (t["relative"] for t in search["trials"]), key=lambda v: abs(math.log(v))
        )
    assert all(r["predicted_ms"] > 0 for r in lat.values())  # each from its plan (the table's groups)


def test_the_study_refuses_a_calibration_set_of_other_stats(tmp_path: Path) -> None:
    """bench/studylib checks the calibration set against each model's mean/std as the CLI does: the shipped
    Fashion-MNIST set (mean 0.286) is accepted for a model of its stats and refused for another's."""
    from slim2deploy.base.errors import SlimError
    from slim2deploy.model.checkpoint import checkpoint_for, save_checkpoint
    from slim2deploy.model.zoo import create_model

    with bench_on_path():
        from studylib.runner import calib_for

    kw = {"in_channels": 1, "num_classes": 10, "width": 0.125}
    said = []
    for mean, std in (([0.286], [0.353]), ([0.5], [0.25])):
        meta = {"mean": mean, "std": std}
        ckpt = checkpoint_for(create_model("vgg11", **kw), "vgg11", kw, (1, 28, 28), 10, meta=meta)
        path = save_checkpoint(ckpt, tmp_path / f"m{mean[0]}.pt")
        try:
            said.append(f"accepted {len(calib_for(path))}")
        except SlimError as exc:
            said.append(f"refused: {exc}")
    accepted, refused = said
    assert accepted == "accepted 512"
    assert refused.startswith("refused:") and "records mean [0.286] but the model's mean is [0.5]" in refused
