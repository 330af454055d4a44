"""The study's tables, targets and Markdown report (the JSON next to it holds every number)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.measure.environment import environment


def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def table(result: dict[str, Any], batches: tuple[int, ...]) -> str:
    rows = result["rows"]
    base = next(r for r in rows if r["variant"] == "baseline")
    head = [
        "variant", "γ<1e-2 %", "acc pruned %", "acc final %", "params", "MACs", "MACs −%", "ONNX KB",
        *[f"b{b} ms" for b in batches], *[f"b{b} speed-up" for b in batches], *[f"b{b} eff." for b in batches],
        "fp16 %", "int8 %", "epochs",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"] if r["ratio"] is None else f"{r['variant']} {r['rails']} {round(r['ratio'] * 100)}%",
            _pct(r["small_gamma"], 1),
            _pct(r["acc_pruned"]),
            _pct(r["acc"]),
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}M",
            _num(100 * (1 - r["macs"] / base["macs"]), ".1f"),
            _num(None if r["onnx_bytes"] is None else r["onnx_bytes"] / 1024, ".0f"),
            *[_num(r["latency_ms"].get(str(b)), ".3f") for b in batches],
            *[_num(r["speedup"].get(str(b))) for b in batches],
            *[_num(r["efficiency"].get(str(b))) for b in batches],
            _pct(r["fp16_acc"]),
            _pct(r["int8_acc"]),
            str(r["epochs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LATENCY_NAMES = {
    "baseline": "unpruned baseline",
    "latency": "latency-targeted",
    "width": "latency-targeted, width only (--no-depth)",
    "gamma": "γ-threshold at equal latency",
    "uniform": "uniform width at equal latency",
    "scratch": "latency-targeted widths from scratch",
}


def latency_name(variant: str) -> str:
    """A row's name; ``+kd``: fine-tuned with distillation from the unpruned sparse model."""
    base, kd = variant.removesuffix("+kd"), variant.endswith("+kd")
    return LATENCY_NAMES[base] + (", distilled" if kd else "")


def latency_table(study: dict[str, Any]) -> str:
    """The latency-matched comparison: one row per way to the same measured latency."""
    head = ["model", "how", "acc before FT %", "acc after FT %", "params", "MACs", "predicted ms", "measured ms",
            "speed-up", "epochs"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in study["rows"]:
        cells = [
            latency_name(r["variant"]),
            r["how"],
            _pct(r["acc_before"]),
            _pct(r["acc"]),
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}M",
            _num(r["predicted_ms"], ".3f"),
            _num(r["measured_ms"], ".3f"),
            f"{r['speedup']:.2f}×",
            str(r["epochs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_section(res: dict[str, Any]) -> list[str]:
    study = res.get("latency_study")
    if not study:
        return []
    b = study["budget"]
    steps = len(study["gamma_search"]["trials"]), len(study["uniform_search"]["trials"])
    distilled = any(r["variant"].endswith("+kd") for r in study["rows"])
    fine_tuning = (
        "once on the labels alone and once (*distilled*) with distillation from the unpruned sparse model"
        if distilled
        else "on the labels alone"
    )
    width_only = (
        " *width only*: the same `--speedup` goal with `--no-depth` (no residual branch removed), to show what depth "
        "adds."
        if study.get("width_only_budget")
        else ""
    )
    return [
        f"### Latency-matched comparison ({res['setup']['arch']}, --speedup {study['speedup_goal']:g})",
        "",
        f"Three models of the same measured latency on {study['target']}: the sparse model pruned with "
        f"`--speedup {study['speedup_goal']:g}` (closed loop: {b['tries']} tries, goal "
        f"{'met' if b['met'] else 'missed'}); the sparse model pruned by the global γ threshold at the ratio whose "
        f"latency, timed interleaved with the first, came closest ({steps[0]} bisection "
        f"steps); and the architecture with every layer narrowed by one factor ({steps[1]} "
        "steps), trained from scratch without the penalty for the sparse-training epochs; and the first model's "
        "widths re-initialised and trained from scratch the same way. All get the same fine-tuning epochs, "
        f"{fine_tuning}. "
        "*acc before FT*: right after surgery (uniform, scratch: after their training from scratch); *predicted*: "
        "the latency table profiled for `--speedup`; *measured*: all the graphs timed together, interleaved (min of "
        f"the round medians); *speed-up*: baseline / model.{width_only}",
        "",
        latency_table(study),
        "",
    ]


def targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The issue's targets for this model at 50% with the default rails: (target, met, measured)."""
    rows = {(r["variant"], r["rails"], r["ratio"]): r for r in result["rows"]}
    base, sparse = rows[("baseline", None, None)], rows[("sparse", None, None)]
    slim = rows.get(("slim", "default", 0.5))
    if slim is None:
        return []
    own, scratch = rows.get(("own-gamma", "default", 0.5)), rows.get(("scratch", "default", 0.5))
    macs_red = 1 - slim["macs"] / base["macs"]
    out = [
        (
            "accuracy right after pruning within 1 point of the unpruned sparse model",
            sparse["acc"] - slim["acc_pruned"] <= 0.01,
            f"{100 * slim['acc_pruned']:.2f}% vs {100 * sparse['acc']:.2f}% "
            f"({100 * (slim['acc_pruned'] - sparse['acc']):+.2f} points)",
        ),
        (
            "after fine-tuning within 0.3 points of the baseline",
            base["acc"] - slim["acc"] <= 0.003,
            f"{100 * slim['acc']:.2f}% vs {100 * base['acc']:.2f}% ({100 * (slim['acc'] - base['acc']):+.2f} points)",
        ),
    ]
    for ctrl, name in ((own, "the baseline pruned by its own γ"), (scratch, "the same architecture from scratch")):
        if ctrl is not None:
            out.append(
                (
                    f"beats {name} at equal MACs",
                    slim["acc"] > ctrl["acc"],
                    f"{100 * slim['acc']:.2f}% vs {100 * ctrl['acc']:.2f}% ({100 * (slim['acc'] - ctrl['acc']):+.2f})",
                )
            )
    out.append(("≥ 40% fewer MACs", macs_red >= 0.4, f"{100 * macs_red:.1f}% fewer"))
    eff = slim["efficiency"].get("64")
    if "64" in slim["speedup"]:
        red = 1 - 1 / slim["speedup"]["64"]
        out.append(
            (
                "batch-64 latency reduced by ≥ 0.8 × the MACs reduction",
                red >= 0.8 * macs_red,
                f"latency −{100 * red:.1f}% vs MACs −{100 * macs_red:.1f}% (efficiency {_num(eff)})",
            )
        )
    if "1" in slim["speedup"]:
        out.append(("not slower than the baseline at batch 1", slim["speedup"]["1"] >= 1.0,
                    f"speed-up {slim['speedup']['1']:.2f}×"))  # fmt: skip
    if slim["int8_acc"] is not None:
        diff = slim["int8_acc"] - slim["acc"]
        out.append(("int8 accuracy within 0.5 points of fp32", abs(diff) <= 0.005, f"{100 * diff:+.2f} points"))
    return out


def environment_info(device: torch.device) -> dict[str, Any]:
    import onnxruntime

    env = environment()
    return {
        "cpu": env.get("cpu"),
        "cpu_count": env.get("cpu_count"),
        "cpus_usable": env.get("cpus_usable"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    env = report["environment"]
    batches = tuple(cfg["bench_batches"])
    out = [
        "# Fashion-MNIST study: Network Slimming against its controls",
        "",
        f"Generated by `{report['command']}` ({cfg['mode']} settings) on {report['finished']}; this "
        f"invocation took {report['seconds'] / 60:.1f} min (stages already in the work dir are reused; the "
        "epoch times of every training are in the JSON).",
        "",
        "Columns: *γ<1e-2* share of BatchNorm scaling factors below 1e-2 after (sparse) training; "
        "*acc pruned* accuracy right after surgery, before fine-tuning; *acc final* after fine-tuning "
        "(controls: after their training); *bN ms* ONNX Runtime CPU median latency at batch N "
        "(baseline and slim models measured interleaved); *speed-up* baseline / model; *eff.* "
        "latency reduction ÷ MACs reduction (1.0 = every removed MAC paid off); fp16 / int8: "
        "accuracy of the fp16 graph and of the calibrated int8 Q/DQ graph (TensorRT flavour, "
        "evaluated on ONNX Runtime CPU). Controls run the same graph as their slim model, so their "
        "latency is the slim model's. Accuracy is top-1 on the Fashion-MNIST test set "
        f"({report['val_images']} images).",
        "",
    ]
    for res in report["results"]:
        s = res["setup"]
        out += [
            f"## {s['arch']} (width {s['width']:g})",
            "",
            f"Sparse training: {s['sparsity_mode']} L1 on γ ({s.get('sparsity_scope', 'all')} of them), "
            f"λ = {s['sparsity']:g}, warm-up "
            f"{s['sparsity_warmup']:g} epochs; {cfg['epochs']} epochs, lr {cfg['lr']:g} ({cfg['schedule']} "
            f"schedule); fine-tuning {cfg['ft_epochs']} epochs, lr {cfg['ft_lr']:g} ({cfg['ft_schedule']}). "
            f"Training time (sum of epochs): {res['train_seconds'] / 60:.1f} min.",
            "",
            table(res, batches),
            "",
        ]
        notes = [f"- {r['variant']} {round(r['ratio'] * 100)}%: {n}" for r in res["rows"] for n in r["notes"]]
        if notes:
            out += [*notes, ""]
        out += latency_section(res)
        checks = targets(res)
        if checks:
            out += [f"Targets at 50% with the default rails ({s['arch']}):", ""]
            out += [f"- {'met' if ok else '**missed**'}: {name} — {got}" for name, ok, got in checks]
            out.append("")
    out += [
        "## How it was run",
        "",
        f"- command: `{report['command']}`",
        f"- seeds: training seed {cfg['seed']} (data order, augmentation, initial weights), scratch control "
        f"initialised with seed {cfg['seed'] + 1}",
        f"- training images: {report['train_images']}, test images: {report['val_images']}, batch "
        f"{cfg['batch_size']}, augmentation: random shift ±2 px and horizontal flip",
        f"- machine: {env['cpu']}, {env['cpus_usable']} usable cores of {env['cpu_count']}, {env['platform']}; "
        f"device {env['device']}" + (f" ({env['gpu']})" if env["gpu"] else ""),
        f"- libraries: torch {env['torch']}, onnxruntime {env['onnxruntime']}, numpy {env['numpy']}, "
        f"python {env['python']}",
        f"- latency: ONNX Runtime CPU, intra-op threads: {cfg['threads']}, {cfg['bench_iterations']} iterations "
        f"in {cfg['bench_rounds']} interleaved rounds after {cfg['bench_warmup_s']:g} s warm-up per model",
        "",
    ]
    return "\n".join(out)


DISCUSSION = "<!-- discussion: hand-written, kept when the study is re-run -->"


def _discussion(path: Path) -> str:
    """The hand-written discussion at the end of an earlier report, so a re-run does not erase it."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(DISCUSSION)
    return "" if at < 0 else "\n" + text[at:]
