"""bench/study.py end to end at a toy size: it trains, prunes, exports, times and writes both reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_smoke_writes_markdown_and_json(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "results.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # this checkout, not an installed copy
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "study.py"), "--smoke", "--threads", "1"]
        + ["--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
    )
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
