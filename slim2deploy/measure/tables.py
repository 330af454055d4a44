"""A benchmark comparison for people: terminal tables, Markdown, a plot, and the files they go in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from slim2deploy.base.files import atomic_path, atomic_write_text
from slim2deploy.base.formats import binary_size, si
from slim2deploy.measure.results import Comparison


def _rows(c: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    gains = {(s.model, s.batch): s for s in c.speedups}
    has_compute = any(b.compute for m in c.models for b in m.batches)
    head = ["model", "batch", "median ms", "mean ms", "min ms", "p90 ms", "p95 ms", "p99 ms", "max ms"]
    head += ["samples/s", "round spread"] + (["compute ms"] if has_compute else []) + ["speed-up"]
    rows = []
    for m in c.models:
        for b in m.batches:
            lat = b.latency
            row = [m.name, str(b.batch)] + [
                f"{v:.3f}"
                for v in (lat.median_ms, lat.mean_ms, lat.min_ms, lat.p90_ms, lat.p95_ms, lat.p99_ms, lat.max_ms)
            ]
            row += [f"{lat.throughput:.1f}", f"{b.spread_pct:.1f}%"]
            if has_compute:
                row.append(f"{b.compute.median_ms:.3f}" if b.compute else "-")
            s = gains.get((m.name, b.batch))
            row.append(f"{s.speedup:.2f}x" if s else ("1.00x (base)" if m.name == c.baseline else "-"))
            rows.append(row)
    size_head = ["model", "params", "MACs/sample", "MACs ratio", "file", "memory", "efficiency (batch)"]
    size_rows = []
    for m in c.models:
        ratios = [s for s in c.speedups if s.model == m.name]
        macs_ratio = ratios[0].macs_ratio if ratios else (1.0 if m.name == c.baseline else None)
        eff = ", ".join(f"{s.efficiency:.2f} ({s.batch})" for s in ratios if s.efficiency is not None) or "-"
        mem = ", ".join(f"{k} {binary_size(v)}" for k, v in m.size.memory.items()) or "-"
        size_rows.append(
            [
                m.name,
                si(m.size.params),
                si(m.size.macs),
                "-" if macs_ratio is None else f"{macs_ratio:.3f}",
                binary_size(m.size.file_bytes),
                mem,
                eff,
            ]
        )
    return head, rows, size_head, size_rows


def _env_line(c: Comparison) -> str:
    e = c.environment
    gpu = e.get("gpu") or {}
    device = gpu.get("gpu_name") or f"{e.get('cpu')} ({e.get('cpus_usable')} CPUs usable)"
    libs = ", ".join(f"{k} {e[k]}" for k in ("onnxruntime", "torch", "tensorrt") if e.get(k))
    runner = c.models[0].runner if c.models else {}
    return f"{device}; {libs}; {runner.get('backend', '?')} on {runner.get('device', '?')}"


def format_table(c: Comparison) -> str:
    """Plain-text tables for a terminal."""
    head, rows, size_head, size_rows = _rows(c)

    def render(h: list[str], rs: list[list[str]]) -> str:
        widths = [max(len(x) for x in col) for col in zip(h, *rs, strict=True)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [h, *rs]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    text = [_env_line(c), "", render(head, rows), "", render(size_head, size_rows)]
    for m in c.models:
        for batch, why in m.skipped.items():
            text.append(f"{m.name}: batch {batch} skipped, {why}")
    return "\n".join(text) + "\n"


def to_markdown(c: Comparison) -> str:
    head, rows, size_head, size_rows = _rows(c)

    def md(h: list[str], rs: list[list[str]]) -> str:
        lines = ["| " + " | ".join(h) + " |", "|" + "|".join("---" for _ in h) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rs])

    e = c.environment
    gpu = e.get("gpu") or {}
    env_rows = [
        ("GPU", gpu.get("gpu_name", "none")),
        ("driver / CUDA", f"{gpu.get('driver', '-')} / {gpu.get('cuda_runtime', e.get('torch_cuda') or '-')}"),
        ("CPU", f"{e.get('cpu')} ({e.get('cpus_usable')} usable of {e.get('cpu_count')})"),
        ("threads", str(e.get("threads") or "runtime default")),
        ("versions", ", ".join(f"{k} {e[k]}" for k in ("onnxruntime", "torch", "tensorrt", "numpy") if e.get(k))),
        ("python / OS", f"{e.get('python')} / {e.get('platform')}"),
    ]
    s = c.settings
    method = (
        f"warm-up {s['warmup_s']} s; {s['iterations']} iterations per batch in {s['rounds']} interleaved rounds; "
        f"{s['input_sets']} input sets rotated; latency is end to end (host in, host out); "
        "round spread = range of per-round medians / median; speed-up = baseline median / model median; "
        "efficiency = latency reduction / MACs reduction."
    )
    parts = [
        "## Latency",
        "",
        md(head, rows),
        "",
        "## Size and memory",
        "",
        md(size_head, size_rows),
        "",
        "## Environment",
        "",
        md(["", ""], [[k, v] for k, v in env_rows]),
        "",
        f"Method: {method}",
        "",
    ]
    return "\n".join(parts)


def plot(c: Comparison, path: str | os.PathLike[str]) -> Path:
    """Latency (median, bars from min to p99) and throughput against batch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in c.models:
        if not m.batches:
            continue
        xs = [b.batch for b in m.batches]
        med = np.array([b.latency.median_ms for b in m.batches])
        lo = med - np.array([b.latency.min_ms for b in m.batches])
        hi = np.array([b.latency.p99_ms for b in m.batches]) - med
        ax_lat.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=m.name)
        ax_thr.plot(xs, [b.latency.throughput for b in m.batches], marker="o", label=m.name)
    batches = sorted({b.batch for m in c.models for b in m.batches})
    for ax, label in ((ax_lat, "latency per batch, ms (median; min..p99)"), (ax_thr, "throughput, samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(_env_line(c), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def write_json(c: Comparison, path: str | os.PathLike[str]) -> Path:
    atomic_write_text(path, json.dumps(c.to_dict(), indent=2) + "\n")
    return Path(path)


def write_markdown(c: Comparison, path: str | os.PathLike[str]) -> Path:
    atomic_write_text(path, to_markdown(c))
    return Path(path)


def write_reports(c: Comparison, out_dir: str | os.PathLike[str], stem: str = "benchmark") -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out_dir``."""
    out = Path(out_dir)
    return {
        "json": write_json(c, out / f"{stem}.json"),
        "markdown": write_markdown(c, out / f"{stem}.md"),
        "plot": plot(c, out / f"{stem}.png"),
    }
