"""``docs/gpu.md`` from the rows of ``bench/gpu.py``: the environment, then a table per target."""

from __future__ import annotations

import argparse
from typing import Any


def fmt(v: Any, spec: str = ".3g", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def render(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    gpu = env.get("gpu") or {}
    on_gpu = args.device == "cuda"
    lines = [
        "# GPU study: slim models against the unpruned baseline per deployment target",
        "",
        "Written by `python bench/gpu.py` (issue 10). torchvision models, random weights, BatchNorm gamma drawn",
        "so that half of every layer's channels are near zero; pruned at the paper's global ratio and to a",
        f"measured speed-up per target; precision {args.precision}, {args.image_size}x{args.image_size} inputs.",
        "",
    ]
    if not on_gpu:
        lines += [
            "> **Not a GPU run.** These numbers are a CPU smoke run of the script "
            f"(`--device cpu`, targets {', '.join(args.targets)}), not GPU measurements. On an H100 run:",
            ">",
            "> `python bench/gpu.py --out docs/gpu.md`",
            "",
        ]
    lines += [
        f"- GPU: {gpu.get('gpu_name', 'none')}, driver {gpu.get('driver', '—')}, "
        f"compute capability {gpu.get('compute_capability', '—')}",
        f"- CUDA (torch build): {env.get('torch_cuda') or '—'}; torch {env.get('torch')}, "
        f"onnxruntime {env.get('onnxruntime') or '—'}, TensorRT {env.get('tensorrt') or '—'}",
        f"- CPU: {env.get('cpu')} ({env.get('cpus_usable')} usable cores), Python {env.get('python')}",
        f"- profiling and the closed loop at batch {args.profile_batch}; rails round_to={args.round_to}; "
        f"benchmark {args.iterations} iterations in {args.rounds} interleaved rounds per batch",
        "",
        "Predicted: the latency table's prediction at the profiling batch (for the ratio rows, from the",
        "table of the same target's speed-up rows). Measured: the target's interleaved measurement at that",
        "batch. Speed-up per batch: baseline median / slim median, "
        + ("GPU compute time (CUDA events)." if on_gpu else "end to end."),
        "",
    ]
    batches = sorted({int(b) for r in rows for b in r.get("batches", {})})
    for target in args.targets:
        mine = [r for r in rows if r["target"] == target]
        if not mine:
            continue
        head = "| model | selection | MACs ratio | predicted ms | measured ms | baseline ms |"
        lines += [f"## {target}", "", head + "".join(f" b{b} |" for b in batches)]
        lines.append("|---|---|---:|---:|---:|---:|" + "---:|" * len(batches))
        for r in mine:
            if "error" in r:
                cells = [r["model"], r["selection"], r["error"]] + [""] * (3 + len(batches))
                lines.append("| " + " | ".join(cells) + " |")
                continue
            cells = [fmt(r["batches"].get(str(b), {}).get("speedup"), ".2f", "x") for b in batches]
            sel = r["selection"] + ("" if r.get("met", True) else " (MISSED)")
            lines.append(
                f"| {r['model']} | {sel} | {fmt(r['macs_ratio'], '.3f')} | {fmt(r.get('predicted_ms'))} | "
                f"{fmt(r['measured_ms'])} | {fmt(r['baseline_ms'])} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)
