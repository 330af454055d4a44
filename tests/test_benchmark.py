"""The measurement method and reports, on real ONNX Runtime sessions and torch checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import SAMPLE, export_tiny
from hypothesis import given
from hypothesis import strategies as st

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.onnx_info import onnx_costs
from slim2deploy.measure.benchmark import benchmark, time_pair
from slim2deploy.measure.memory import peak_rss
from slim2deploy.measure.results import Comparison, LatencyStats
from slim2deploy.measure.tables import format_table, to_markdown, write_reports
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.model.zoo import create_model
from slim2deploy.runtime.ort import OrtRunner

FAST = {"warmup_s": 0.05, "iterations": 24, "rounds": 4, "input_sets": 2, "device": "cpu", "threads": 1}


@given(st.integers(1, 256), st.lists(st.floats(0.001, 1e4, allow_nan=False), min_size=1, max_size=300))
def test_latency_stats_are_ordered_and_throughput_is_batch_over_mean(batch, times):
    s = LatencyStats.from_samples(batch, times)
    assert s.min_ms <= s.median_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    assert s.min_ms * (1 - 1e-12) <= s.mean_ms <= s.max_ms * (1 + 1e-12)  # the mean carries rounding
    assert s.throughput == pytest.approx(batch * 1000 / s.mean_ms)
    assert s.iterations == len(times)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    base, base_model = export_tiny(d / "base.onnx", 16)
    slim, slim_model = export_tiny(d / "slim.onnx", 8)
    return base, slim, base_model, slim_model


@pytest.fixture(scope="module")
def comparison(pair) -> Comparison:
    base, slim, _, _ = pair
    return time_pair(base, slim, batches=[4, 1], **FAST)


def test_interleaved_comparison_has_sane_statistics(comparison, pair):
    c = comparison
    assert [m.name for m in c.models] == ["baseline", "slim"] and c.baseline == "baseline"
    assert c.settings["batches"] == [1, 4]
    for m in c.models:
        assert [b.batch for b in m.batches] == [1, 4]
        for b in m.batches:
            lat = b.latency
            assert lat.iterations == FAST["iterations"]
            assert len(b.round_medians_ms) == FAST["rounds"]
            assert lat.min_ms <= min(b.round_medians_ms) <= max(b.round_medians_ms) <= lat.max_ms
            assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
            assert lat.throughput == pytest.approx(b.batch * 1000 / lat.mean_ms)
            assert b.compute is None  # ONNX Runtime on CPU cannot separate device time
    speed = {s.batch: s for s in c.speedups}
    assert set(speed) == {1, 4} and all(s.model == "slim" for s in c.speedups)
    for batch, s in speed.items():
        base_b, slim_b = c.model("baseline").at(batch), c.model("slim").at(batch)
        assert s.speedup == pytest.approx(base_b.latency.median_ms / slim_b.latency.median_ms)
        assert s.latency_reduction == pytest.approx(1 - 1 / s.speedup)
        assert s.efficiency == pytest.approx(s.latency_reduction / (1 - s.macs_ratio))


def test_sizes_come_from_the_onnx_graph_and_a_separate_process(comparison, pair):
    _, _, base_model, slim_model = pair
    x = torch.zeros(1, *SAMPLE)
    base, slim = comparison.model("baseline").size, comparison.model("slim").size
    assert base.cost_source == slim.cost_source == "onnx graph"
    assert base.macs == count_macs(base_model, x) and slim.macs == count_macs(slim_model, x)
    assert comparison.speedups[0].macs_ratio == pytest.approx(slim.macs / base.macs)
    # the exporter folds BatchNorm into the conv before it: gamma and beta disappear into its weights
    assert base.params == count_params(base_model) - 2 * base_model[1].num_features
    for size in (base, slim):
        assert size.file_bytes > 0
        assert size.memory["ort_peak_rss"] >= size.memory["ort_runtime_only_rss"] > 10 * 2**20


def test_onnx_costs_match_torch_on_a_zoo_model(tmp_path):
    model = create_model("resnet20", width=0.25).eval()
    x = torch.zeros(1, 3, 32, 32)
    path = tmp_path / "resnet20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), input_names=["input"], dynamic_axes={"input": {0: "N"}}, dynamo=False)
    assert onnx_costs(path)["macs"] == count_macs(model, x)


def test_onnx_costs_say_no_macs_where_a_layer_shape_is_unknown_and_a_sidecar_fills_them(tmp_path):
    """A convolution shape inference cannot follow (here: an input of unknown height and width; in a real graph,
    padding computed from the input's shape) makes any MACs sum wrong: none is given, and the runner takes the
    MACs from a sidecar json where one exists."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from slim2deploy.runtime.ort import OrtRunner

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert onnx_costs(path) == {"params": 4 * 3 * 3 * 3}
    (tmp_path / "conv.onnx.json").write_text(json.dumps({"params": 1, "macs": 1234}))
    assert OrtRunner(path).costs() == ({"params": 108, "macs": 1234}, "onnx graph, MACs from the sidecar json")


def test_reports_are_written_and_json_round_trips(comparison, tmp_path):
    paths = write_reports(comparison, tmp_path / "out", stem="latency")
    data = json.loads(paths["json"].read_text())
    assert Comparison.from_dict(data).to_dict() == comparison.to_dict()
    assert data["environment"]["cpu"] and data["environment"]["onnxruntime"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    for needle in ("| baseline | 1 |", "| slim | 4 |", "## Environment", "efficiency", "x |"):
        assert needle in md
    assert md == to_markdown(comparison)
    table = format_table(comparison)
    assert "1.00x (base)" in table and "samples/s" in table and "p99 ms" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["latency.json", "latency.md", "latency.png"]


def test_batches_outside_a_model_range_are_skipped_not_failed(tmp_path, pair):
    static, _ = export_tiny(tmp_path / "static4.onnx", 4, static_batch=4)
    c = benchmark([pair[1], static], batches=[1, 4], measure_rss=False, **FAST)
    m = c.model("static4")
    assert [b.batch for b in m.batches] == [4]
    assert "1" in str(m.skipped) and "4..4" in m.skipped[1]
    assert [b.batch for b in c.model("slim").batches] == [1, 4]
    assert c.baseline is None and c.speedups == []
    assert "static4: batch 1 skipped" in format_table(c)


def test_torch_checkpoint_backend(make_checkpoint):
    path = make_checkpoint()  # vgg11 at width 0.125, 1x28x28
    model = create_model("vgg11", in_channels=1, width=0.125)
    c = benchmark([path], batches=[2], **FAST)
    m = c.model("vgg11")
    assert m.runner["backend"] == "torch" and m.size.cost_source == "torch"
    assert m.size.macs == count_macs(model, torch.zeros(1, 1, 28, 28))
    assert m.batches[0].latency.iterations == FAST["iterations"]


def test_bad_requests_fail_clearly(pair, tmp_path):
    with pytest.raises(SlimError, match="positive"):
        benchmark([pair[0]], batches=[0], **FAST)
    with pytest.raises(SlimError, match="at least one iteration per round"):
        benchmark([pair[0]], batches=[1], **{**FAST, "iterations": 2, "rounds": 3})
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    with pytest.raises(SlimError, match="failed"):
        peak_rss(OrtRunner(broken, device="cpu"), 1)
