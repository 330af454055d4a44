"""The build report: one JSON with every number, and a Markdown page a person reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slim2deploy.base.cache import NUMBER, Shape
from slim2deploy.base.files import atomic_write_text
from slim2deploy.base.formats import si
from slim2deploy.measure.results import Comparison
from slim2deploy.measure.tables import to_markdown

# What the report reads of each stage's recorded info (build.json); a build re-runs a stage whose
# record does not fit, so a hand-edited value never reaches the report as a crash or a wrong number.
OPTIONAL = (*NUMBER, type(None))
LATENCY_TRY: Shape = {k: NUMBER for k in ("budget_ms", "predicted_ms", "measured_ms", "baseline_ms", "goal_ms")}
PRUNE_INFO: Shape = {"latency": (type(None), {"goal": str, "met": bool, "tries": [LATENCY_TRY]})}
EXPORT_INFO: Shape = {
    "bytes": int,
    "summary": str,
    "parity": {"max_abs": NUMBER, "max_rel": NUMBER, "top1_agreement": NUMBER},
}
PRECISION_INFO: Shape = {
    "top1_agreement": NUMBER,
    "accuracy": OPTIONAL,
    "reference_accuracy": OPTIONAL,
    "ort_optimization": str,
    "summary": str,
}


# ONNX ops that are a convolution or a linear layer: what "layers" counts in a graph
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.3f}x" if a and b is not None else "-"


def graph_counts(op_counts: Any) -> dict[str, int] | None:
    """Convolution/linear layers and all nodes of an ONNX graph from its op counts (``ExportResult.op_counts``);
    None where the record holds no such counts."""
    if not isinstance(op_counts, dict) or not all(isinstance(v, int) for v in op_counts.values()):
        return None
    return {"layers": sum(op_counts.get(op, 0) for op in LAYER_OPS), "nodes": sum(op_counts.values())}


def batch_latency(benchmark: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Median latency (ms) of the baseline and slim fp32 graphs at every batch the benchmark timed both."""
    if not benchmark:
        return {}
    models = {m.name: m for m in Comparison.from_dict(benchmark).models}
    if "baseline" not in models or "slim" not in models:
        return {}
    found = {}
    for slim in models["slim"].batches:
        base = models["baseline"].at(slim.batch)
        if base is not None:
            found[str(slim.batch)] = {"baseline_ms": base.latency.median_ms, "slim_ms": slim.latency.median_ms}
    return found


def _structure_lines(report: dict[str, Any]) -> list[str]:
    """Table rows: conv/linear layers and ONNX nodes, latency at each benchmarked batch."""
    graphs = (report.get("structure") or {}).get("graphs") or {}
    lines = []
    if "baseline" in graphs and "slim" in graphs:
        for key, what in (("layers", "conv/linear layers (ONNX)"), ("nodes", "ONNX nodes")):
            b, s = graphs["baseline"][key], graphs["slim"][key]
            lines.append(f"| {what} | {b} | {s} | {_ratio(b, s)} |")
    for batch, ms in (report.get("latency") or {}).items():
        b, s = ms["baseline_ms"], ms["slim_ms"]
        lines.append(f"| latency, batch {batch} (ORT CPU fp32, median ms) | {b:.3f} | {s:.3f} | {_ratio(b, s)} |")
    return lines


def _blocks_line(report: dict[str, Any]) -> list[str]:
    structure = report.get("structure") or {}
    removable, removed = structure.get("blocks_removable", 0), structure.get("blocks_removed", [])
    if not removable:
        return []
    shown = ", ".join(removed[:8]) + (", ..." if len(removed) > 8 else "")
    return [
        "",
        f"Residual blocks removed: {len(removed)} of {removable} removable" + (f" ({shown})." if removed else "."),
    ]


def build_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    base, slim = report["baseline"], report["slim"]
    exports = report.get("exports", {})
    acc = report.get("accuracy") or {}
    lines = [
        "# slim2deploy build report",
        "",
        f"Model `{report['model']}`, pruned by {report['selection']}"
        + ("; approximate: groups read raw by another layer could be cut" if cfg.get("exact") is False else "")
        + (f", fine-tuned on {cfg['data']}" if acc.get("after_finetune") is not None else "")
        + ".",
        "",
        "| | baseline | slim | slim / baseline |",
        "|---|---:|---:|---:|",
        f"| params | {si(base['params'])} | {si(slim['params'])} | {_ratio(base['params'], slim['params'])} |",
        f"| MACs / image | {si(base['macs'])} | {si(slim['macs'])} | {_ratio(base['macs'], slim['macs'])} |",
    ]
    if "baseline" in exports and "slim" in exports:
        b, s = exports["baseline"].get("bytes"), exports["slim"].get("bytes")
        lines.append(f"| ONNX fp32 bytes | {si(b)} | {si(s)} | {_ratio(b, s)} |")
    lines += _structure_lines(report)
    if acc.get("baseline") is not None:
        lines.append(
            f"| top-1 accuracy (torch, {acc['images']} held-out images) | {acc['baseline']:.2%} | {acc['final']:.2%} | "
            f"{-acc['drop_points']:+.2f} pts |"
        )
    lines += _blocks_line(report)
    lines += ["", *_accuracy_lines(acc)]
    lines += _budget_lines(report.get("latency_target"))
    parity = {n: e.get("parity") for n, e in exports.items() if e.get("parity")}
    if parity:
        lines += [
            "",
            "## ONNX parity (ONNX Runtime CPU vs torch)",
            "",
            "| model | max abs | max rel | top-1 agree |",
            "|---|---:|---:|---:|",
        ]
        for name, p in parity.items():
            lines.append(f"| {name} | {p['max_abs']:.2e} | {p['max_rel']:.2e} | {p['top1_agreement']:.2%} |")
    prec = report.get("precision") or {}
    if prec:
        lines += [
            "",
            "## Reduced precision (ONNX Runtime CPU, against the fp32 graph)",
            "",
            "| graph | top-1 agreement | accuracy | fp32 accuracy | ORT optimisation |",
            "|---|---:|---:|---:|---|",
        ]
        for name, r in prec.items():
            a = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2%}"
            ra = "-" if r.get("reference_accuracy") is None else f"{r['reference_accuracy']:.2%}"
            lines.append(f"| {name} | {r['top1_agreement']:.2%} | {a} | {ra} | {r.get('ort_optimization', '')} |")
    engines = report.get("engines")
    lines += ["", "## TensorRT engines", ""]
    if isinstance(engines, dict) and engines:
        for name, m in engines.items():
            lines.append(f"- `{name}`: TensorRT {m.get('tensorrt_version')}, {m.get('gpu_name')}, {m.get('precision')}")
    else:
        lines.append(str(engines or "none built"))
    if report.get("benchmark"):
        lines += [
            "",
            "Benchmark: every graph the build made on ONNX Runtime (CPU), measured interleaved against the fp32 "
            "baseline.",
            "",
            to_markdown(Comparison.from_dict(report["benchmark"])),
        ]
    arts = report.get("artifacts", {})
    lines += ["", "## Files", ""]
    for name, paths in arts.items():
        for prec_name, path in paths.items():
            lines.append(f"- {name} {prec_name}: `{path}`")
    return "\n".join(lines) + "\n"


def _budget_lines(lat: dict[str, Any] | None) -> list[str]:
    """The closed loop's tries, for a latency goal."""
    if not lat:
        return []
    lines = [
        "",
        f"## Latency budget: {lat['goal']} ({'met' if lat['met'] else 'MISSED'})",
        "",
        "The slim model measured on the target interleaved with the unpruned one, after each selection:",
        "",
        "| try | budget ms | predicted ms | measured ms | unpruned ms | goal ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, t in enumerate(lat["tries"], 1):
        lines.append(
            f"| {i} | {t['budget_ms']:.4g} | {t['predicted_ms']:.4g} | {t['measured_ms']:.4g} | "
            f"{t['baseline_ms']:.4g} | {t['goal_ms']:.4g} |"
        )
    lines += [
        "",
        "Met or missed is the closed loop's measurement above; the latency table of this report is a separate, "
        "longer run of the exported graphs, so its speed-up differs by the target's timing noise (a few percent "
        "on a quiet machine, more on a busy one).",
    ]
    return lines


def at_chance(score: float, majority: float) -> bool:
    """A top-1 ``score`` no better than always answering the most common held-out class (``majority``, that
    class's share); never where that class is all there is (one class held out: answering it scores 100%)."""
    return majority < 1.0 and score <= majority


def _accuracy_lines(acc: dict[str, Any]) -> list[str]:
    """The three evaluations and the allowance, or why accuracy is unknown."""
    if acc.get("baseline") is None:
        return ["## Accuracy", "", "Not measured: no held-out data was given; the allowance was not checked."]
    rows = [("unpruned", acc["baseline"]), ("right after surgery", acc["after_surgery"])]
    if acc.get("after_finetune") is not None:
        rows.append(("after fine-tuning", acc["after_finetune"]))
    lines = [
        "## Accuracy",
        "",
        f"Top-1 on {acc['images']} held-out images (torch):",
        "",
        "| model | top-1 |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value:.2%} |" for name, value in rows]
    majority = acc.get("majority_class")
    if majority is not None and at_chance(acc["baseline"], majority):
        guards = "the allowance below guards nothing" if acc.get("max_drop") is not None else "its drop says little"
        lines += [
            "",
            f"**Warning**: the unpruned model does no better than always answering the most common held-out "
            f"class ({majority:.2%}): its weights do not fit this data, so {guards}.",
        ]
    if acc.get("max_drop") is not None:
        verdict = "within" if acc["within_allowance"] else "**over**"
        lines += [
            "",
            f"Drop {acc['drop_points']:.2f} points: {verdict} the allowance of {acc['max_drop']:g} (max drop).",
        ]
    return lines


def write_build_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    markdown = build_markdown(report)  # first: a report it cannot render leaves the old files as they were
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str))
    atomic_write_text(md_path, markdown)
    return [json_path, md_path]
