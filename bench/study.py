"""Fashion-MNIST study: what Network Slimming delivers against two controls, in one command.

    python bench/study.py [--quick] [--latency-study | --latency-only] [--speedup S]
                          [--out docs/results.md] [--work DIR] [--device auto]

For each model (a VGG and a pre-activation ResNet from the zoo) it trains a baseline (lambda=0)
and a sparse model, prunes the sparse model at every ratio with the paper-exact rails and with
the default rails, fine-tunes each slim model, exports fp32/fp16/int8 ONNX, measures accuracy
and ONNX Runtime CPU latency (baseline and slim models interleaved), and runs two controls at
the same kept widths as each default-rails slim model:

- ``own-gamma``: the baseline pruned by its own |gamma| ranking (per group, the same number of
  channels the slim model keeps: a ``WidthsSelector``) and fine-tuned for the same epochs;
- ``scratch``: the slim architecture re-initialised and trained from scratch for the sparse
  epochs plus the fine-tune epochs (Liu et al. 2019, "Rethinking the Value of Network Pruning").

With ``--latency-study`` (default in ``--quick``) it also compares, at equal measured ONNX Runtime
CPU latency (batch 64), the sparse model pruned by ``--speedup S`` against gamma-threshold slimming
at the ratio of the same latency and a uniformly narrower model (``bench/studylib/latency.py``).

Everything goes through the library's pipeline (``bench/studylib/runner.py`` says which piece does
what). Checkpoints and per-stage results are cached under ``--work`` in a folder keyed by the
settings, so an interrupted run resumes where it stopped (training resumes at the last finished
epoch). The Markdown table and the JSON next to it are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from studylib.config import full_config, quick_config, smoke_config
from studylib.report import _discussion, environment_info, render, targets
from studylib.runner import ROOT, Study

from slim2deploy.base.files import atomic_write_text
from slim2deploy.model.distributed import pick_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: vgg11, 10k images, 2+1 epochs, 50%% only")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"), help="Markdown report (JSON written beside it)")
    p.add_argument("--work", default=str(ROOT / "runs" / "study"), help="checkpoints and cached stage results")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--models", help="comma-separated subset of the configured models, e.g. vgg11")
    p.add_argument("--epochs", type=int, help="override the baseline/sparse training epochs")
    p.add_argument("--ft-epochs", type=int, help="override the fine-tuning epochs")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--sparsity", type=float, help="override lambda of the selected models")
    p.add_argument("--width", type=float, help="override the width multiplier of the selected models (e.g. 0.5)")
    p.add_argument("--sparsity-warmup", type=float, help="override the lambda warm-up (epochs) of the selected models")
    p.add_argument(
        "--latency-study",
        action="store_true",
        help="add the latency-matched comparison (--speedup target, γ-threshold at equal latency, uniform width); "
        "on by default with --quick",
    )
    p.add_argument(
        "--latency-only",
        action="store_true",
        help="train the baseline and the sparse model and run only the latency-matched comparison",
    )
    p.add_argument("--speedup", type=float, help="speed-up goal of the latency-matched comparison (default 2)")
    p.add_argument("--no-distill", action="store_true", help="fine-tune the latency-matched rows on the labels "
                   "alone (no +kd rows: half the fine-tuning time)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime CPU threads (default 2)")
    p.add_argument("--seed", type=int, help="training seed (default 0): a repeat of the study with other data order, "
                   "augmentation and initial weights; its checkpoints go to their own work folders")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    cfg = smoke_config() if args.smoke else quick_config(cuda) if args.quick else full_config(cuda)
    cfg.threads = args.threads
    if args.models:
        wanted = args.models.split(",")
        cfg.models = [m for m in cfg.models if m.arch in wanted]
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    if args.ft_epochs:
        cfg = replace(cfg, ft_epochs=args.ft_epochs)
    if args.sparsity is not None:
        cfg.models = [replace(m, sparsity=args.sparsity) for m in cfg.models]
    if args.width is not None:
        cfg.models = [replace(m, width=args.width) for m in cfg.models]
    if args.sparsity_warmup is not None:
        cfg.models = [replace(m, sparsity_warmup=args.sparsity_warmup) for m in cfg.models]
    if args.latency_only:  # ratios and rails are not part of the work dir's key: the checkpoints stay shared
        cfg = replace(cfg, rails=())
        cfg.models = [replace(m, ratios=(), control_ratios=()) for m in cfg.models]
    if args.latency_study or args.latency_only or args.speedup is not None:
        cfg = replace(cfg, latency_speedup=args.speedup or cfg.latency_speedup or 2.0)
    if args.limit_train:
        cfg = replace(cfg, limit_train=args.limit_train)
    if args.no_distill:
        cfg = replace(cfg, latency_distill=False)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    overridden = any(
        v is not None for v in (args.epochs, args.ft_epochs, args.sparsity, args.sparsity_warmup, args.limit_train)
    )
    if overridden:
        cfg = replace(cfg, mode=f"{cfg.mode}, overridden by the flags")
    if not cfg.models:
        print(f"no model left after --models {args.models}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {msg}", flush=True)

    results = []
    train_n = val_n = 0
    for setup in cfg.models:
        study = Study(cfg, setup, Path(args.work), device, log)
        train_n, val_n = len(study.train_ds), len(study.val_ds)
        log(f"{setup.arch} width {setup.width:g}: work dir {study.dir}")
        results.append(study.run())
    command = "python bench/study.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    report = {
        "format": "slim2deploy.study/1",
        "command": command.strip(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "environment": environment_info(device),
        "train_images": train_n,
        "val_images": val_n,
        "results": results,
        "targets": {
            r["arch"]: [{"target": t, "met": ok, "measured": got} for t, ok, got in targets(r)] for r in results
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    atomic_write_text(out, render(report) + _discussion(out))
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
