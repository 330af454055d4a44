"""slim2deploy against Torch-Pruning at equal MACs: one interleaved ONNX Runtime CPU run per model.

    pip install 'torch-pruning>=1.5'        # or: pip install -e '.[peers]'
    python bench/peers.py [--models demo,resnet56] [--ratio 0.5] [--batches 1,64]
        [--resnet56 trained|drawn] [--finetune-epochs 3] [--work DIR] [--json FILE]

For each model: slim2deploy prunes the sparse checkpoint with ``--ratio`` (default rails, exact mode),
depth on and, as a second row, depth off (only where depth removed a branch: else the two are one
model). For each slim2deploy model, Torch-Pruning (``tp.pruner.BasePruner`` with
``tp.importance.BNScaleImportance``, global pruning, ``round_to`` 8, ``max_pruning_ratio`` 0.9 like
the rails' ``max_prune``, the classifier ignored) prunes the same checkpoint with its ratio bisected
until its MACs are within ``--macs-tolerance`` of slim2deploy's. Both are fine-tuned the same way
(``model.loop.fit``: same data, epochs, lr, schedule and seed), exported with
``deploy.export.export_onnx``, and timed interleaved with the unpruned model by
``measure.benchmark.benchmark``.

Models: ``demo`` is ``demo/vgg11-w0.25-sparse.pt`` (sparse-trained on Fashion-MNIST). ``resnet56``
(width 1.0, 1x28x28) is either ``trained``: sparse-trained here on Fashion-MNIST with L1 and the block
penalty (``--train-*`` flags; the checkpoint is kept in ``--work`` and reused), or ``drawn``: random
weights with gamma drawn as sparse training leaves it (half of every layer near 0, as
``bench/latency_target.py`` makes it) and the inner group of ``--dead-blocks`` of its residual
branches set to 0 -- a timing-only model, so its accuracy columns are empty.

Prints a Markdown table to paste into docs/results.md: MACs, params, top-1 after pruning and after
fine-tuning (on the first ``--eval-limit`` test images), the speed-up over the unpruned model at each
batch, and slim2deploy's speed-up divided by its MACs-matched Torch-Pruning model's.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from slim2deploy.base.files import atomic_write_text
from slim2deploy.deploy.export import export_onnx
from slim2deploy.measure.benchmark import benchmark
from slim2deploy.measure.results import Comparison
from slim2deploy.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from slim2deploy.model.loop import TrainConfig, evaluate, fit
from slim2deploy.model.preprocess import data_for
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.pipeline.import_model import sparse_like_checkpoint
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.pipeline.train import train_command
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_ROUND_TO
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import by_ratio
from slim2deploy.prune.trace import branch_groups

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "vgg11-w0.25-sparse.pt"
TIE_BREAK = 1e-9


def torch_pruning() -> ModuleType:
    try:
        import torch_pruning as tp
    except ImportError:
        sys.exit(
            "bench/peers.py needs Torch-Pruning: pip install 'torch-pruning>=1.5' "
            "(or the project's extra: pip install -e '.[peers]')"
        )
    return tp


@dataclass
class Entry:
    """One model of a table: how it was made, its cost, its accuracy and its ONNX file."""

    name: str
    model: nn.Module
    macs: int
    params: int
    pruned_acc: float | None = None
    tuned_acc: float | None = None
    matches: str | None = None  # a Torch-Pruning model: the slim2deploy entry it is matched to
    note: str = ""
    onnx: Path | None = None


def tp_prune(tp: ModuleType, model: nn.Module, x: torch.Tensor, ratio: float, round_to: int) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at ``ratio``: BatchNorm-scale importance, one global
    ranking, channel counts rounded to ``round_to``; the classifier keeps its outputs."""
    pruned = copy.deepcopy(model).eval()
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.BasePruner(
        pruned,
        x,
        importance=tp.importance.BNScaleImportance(),
        global_pruning=True,
        pruning_ratio=ratio,
        max_pruning_ratio=DEFAULT_MAX_PRUNE,
        round_to=round_to,
        ignored_layers=linears[-1:],
    )
    pruner.step()
    return pruned


def distinct_zeros(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy whose BatchNorm gammas that are exactly 0 get distinct values below ``TIE_BREAK`` instead.

    Torch-Pruning's global ranking prunes every channel whose importance is at most its threshold
    (``imp <= thres``): on a model trained with proximal L1, whose gammas are exactly 0, any ratio whose
    threshold is 0 removes all of them, so its ratio cannot match a MACs budget above that. Distinct
    tiny gammas rank those channels (arbitrarily, as a tie is) and change the outputs by less than that."""
    spread = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in spread.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                zero = m.weight == 0
                m.weight[zero] = torch.rand(int(zero.sum()), generator=gen) * TIE_BREAK
    return spread


def tp_matched(
    tp: ModuleType, model: nn.Module, x: torch.Tensor, goal: int, round_to: int, tolerance: float
) -> tuple[nn.Module, float]:
    """Torch-Pruning's model whose MACs are closest to ``goal``, and its ratio; exact-zero gammas tie-broken
    (``distinct_zeros``). Its MACs are not monotone in the ratio (measured on resnet56: x0.32 at 0.6, x0.38
    at 0.7, x1.0 at 0.9), so the ratio is scanned in steps of 0.05 and then bisected between the first two
    neighbours whose MACs bracket the goal."""
    model = distinct_zeros(model)
    tried: dict[float, tuple[int, nn.Module]] = {}

    def at(ratio: float) -> int:
        if ratio not in tried:
            pruned = tp_prune(tp, model, x, ratio, round_to)
            tried[ratio] = (count_macs(pruned, x), pruned)
        return tried[ratio][0]

    grid = [round(0.05 * i, 2) for i in range(1, 19)]
    bracket = next(((a, b) for a, b in itertools.pairwise(grid) if at(a) >= goal >= at(b)), None)
    if bracket is not None:
        lo, hi = bracket
        for _ in range(10):
            mid = (lo + hi) / 2
            if abs(at(mid) - goal) <= tolerance * goal:
                break
            lo, hi = (mid, hi) if at(mid) > goal else (lo, mid)
    ratio = min(tried, key=lambda r: abs(tried[r][0] - goal))
    return tried[ratio][1], ratio


def trained_resnet56(args: argparse.Namespace, work: Path) -> Path:
    """resnet56 sparse-trained on Fashion-MNIST with L1 and the block penalty; reused when ``work`` has it."""
    name = (
        f"resnet56-l1{args.train_sparsity:g}-block{args.train_block:g}-e{args.train_epochs}"
        f"-n{args.train_limit}-s{args.seed}.pt"
    )
    out = work / name
    if out.exists():
        print(f"reusing {out}", flush=True)
        return out
    cfg = TrainConfig(
        epochs=args.train_epochs, sparsity=args.train_sparsity, sparsity_mode="proximal",
        sparsity_block=args.train_block, seed=args.seed,
    )  # fmt: skip
    train_command(
        arch="resnet56", width=1.0, data="fashion-mnist", data_dir=None, image_size=None,
        limit_train=args.train_limit, eval_limit=args.eval_limit, cfg=cfg, out=str(out), device="auto",
    )  # fmt: skip
    return out


def drawn_resnet56(args: argparse.Namespace, work: Path) -> Path:
    """resnet56 with gamma drawn sparse-like and the inner group of ``--dead-blocks`` of its branches at 0."""
    out = work / f"resnet56-drawn-dead{args.dead_blocks:g}-s{args.seed}.pt"
    meta = {"dataset": "fashion-mnist"}
    sparse_like_checkpoint("resnet56", out, (1, 28, 28), seed=args.seed, meta=meta, in_channels=1, num_classes=10)
    ckpt = load_checkpoint(out)
    model = model_from_checkpoint(ckpt)
    groups = branch_groups(model, torch.zeros(1, 1, 28, 28))
    dead = torch.randperm(len(groups), generator=torch.Generator().manual_seed(args.seed))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i in dead[: round(args.dead_blocks * len(groups))].tolist():
            for name, idx in groups[i].channels.items():
                params[name][idx] = 0.0
    ckpt.state_dict = model.state_dict()
    save_checkpoint(ckpt, out)
    return out


def slim_entries(
    tp: ModuleType, src: Path, args: argparse.Namespace, work: Path, stem: str
) -> tuple[nn.Module, list[Entry]]:
    """The unpruned model and, for depth on (and off, where depth removed something), slim2deploy's model
    and Torch-Pruning's matched to its MACs."""
    base = model_from_checkpoint(load_checkpoint(src)).eval()
    x = torch.zeros(1, *load_checkpoint(src).input_shape)
    entries = [Entry("unpruned", base, count_macs(base, x), count_params(base))]
    removed = 0
    for depth in (True, False):
        if not depth and removed == 0:
            break  # depth removed nothing: depth off is the same model
        dst = work / f"{stem}-s2d-depth-{'on' if depth else 'off'}.pt"
        plan, _ = prune_checkpoint(src, dst, by_ratio(args.ratio, depth=depth))
        removed = len(plan.removed_branches())
        slim = model_from_checkpoint(load_checkpoint(dst)).eval()
        name = f"slim2deploy depth {'on' if depth else 'off'}"
        macs = count_macs(slim, x)
        entries.append(Entry(name, slim, macs, count_params(slim), note=f"{removed} blocks removed"))
        pruned, ratio = tp_matched(tp, base, x, macs, args.round_to, args.macs_tolerance)
        miss = count_macs(pruned, x) / macs - 1
        note = f"ratio {ratio:.4f}" + (f"; MACs {miss:+.1%} off" if abs(miss) > args.macs_tolerance else "")
        tp_name = f"Torch-Pruning (MACs of depth {'on' if depth else 'off'})"
        entries.append(Entry(tp_name, pruned, count_macs(pruned, x), count_params(pruned), matches=name, note=note))
    return base, entries


def add_accuracy(entries: list[Entry], ckpt: Checkpoint, args: argparse.Namespace) -> None:
    """Top-1 of every model as pruned, then after the same fine-tuning (the unpruned model is not tuned)."""
    val = data_for(ckpt, "fashion-mnist", "val", limit=args.eval_limit)
    train = data_for(ckpt, "fashion-mnist", "train", limit=args.finetune_limit) if args.finetune_epochs else None
    for e in entries:
        e.pruned_acc = evaluate(e.model, val, 256)[1]
        if train is None or e.name == "unpruned":
            continue
        cfg = TrainConfig(
            epochs=args.finetune_epochs, lr=args.finetune_lr, schedule="cosine", seed=args.seed, weight_decay=1e-4
        )
        fit(e.model, train, None, cfg, progress=False, desc=e.name)
        e.model.eval()
        e.tuned_acc = evaluate(e.model, val, 256)[1]


def time_all(entries: list[Entry], x: torch.Tensor, args: argparse.Namespace, work: Path, stem: str) -> Comparison:
    for i, e in enumerate(entries):
        e.onnx = work / f"{stem}-{i}.onnx"
        export_onnx(e.model.cpu().eval(), x, e.onnx)  # fine-tuning may have moved it to a GPU
    return benchmark(
        [e.onnx for e in entries[1:] if e.onnx is not None],
        baseline=entries[0].onnx,
        names=[e.name for e in entries],
        batches=args.batches,
        iterations=args.iterations,
        rounds=args.rounds,
        threads=args.threads,
        device="cpu",
        measure_rss=False,
    )


def rows(model: str, entries: list[Entry], comparison: Comparison, batches: list[int]) -> list[str]:
    speed = {(s.model, s.batch): s.speedup for s in comparison.speedups}
    for b in batches:
        speed[("unpruned", b)] = 1.0
    base = entries[0]
    out = []
    for e in entries:
        acc = [f"{a:.2%}" if a is not None else "-" for a in (e.pruned_acc, e.tuned_acc)]
        ups = [f"{speed[(e.name, b)]:.2f}x" for b in batches]
        ours = next((o for o in entries if o.name == e.matches), None)
        versus = [f"{speed[(ours.name, b)] / speed[(e.name, b)]:.2f}" if ours else "" for b in batches]
        out.append(
            f"| {model} | {e.name} | {e.macs / 1e6:.2f}M | {e.macs / base.macs:.3f} | {e.params:,} | {acc[0]} | "
            f"{acc[1]} | {' | '.join(ups)} | {' | '.join(versus)} | {e.note} |"
        )
    return out


def settings(args: argparse.Namespace, env: dict, tp_version: str) -> str:
    """The line under the table: everything a reader needs to repeat it."""
    line = (
        f"ONNX Runtime {env.get('onnxruntime')} CPU ({env.get('cpu')}, threads {args.threads or 'default'}), "
        f"fp32, batches {args.batches}, {args.iterations} iterations x {args.rounds} interleaved rounds; "
        f"slim2deploy --ratio {args.ratio:g}, default rails, exact mode; Torch-Pruning {tp_version} "
        f"BNScaleImportance, global, round_to {args.round_to}, max_pruning_ratio {DEFAULT_MAX_PRUNE:g}, MACs "
        f"matched within {args.macs_tolerance:.1%}; fine-tuning: {args.finetune_epochs} epochs on the first "
        f"{args.finetune_limit} Fashion-MNIST training images, lr {args.finetune_lr:g} cosine, seed {args.seed}; "
        f"top-1 on the first {args.eval_limit} test images"
    )
    if "resnet56" in args.models and args.resnet56 == "trained":
        line += (
            f"; resnet56 sparse-trained here: {args.train_epochs} epochs on {args.train_limit} images, L1 "
            f"{args.train_sparsity:g} proximal, --sparsity-block {args.train_block:g}"
        )
    elif "resnet56" in args.models:
        line += f"; resnet56 drawn (untrained, no accuracy): {args.dead_blocks:.0%} of its branches' groups at 0"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,resnet56")
    p.add_argument("--ratio", type=float, default=0.5, help="slim2deploy's --ratio")
    p.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, help="Torch-Pruning's round_to")
    p.add_argument("--macs-tolerance", type=float, default=0.015, help="how close Torch-Pruning's MACs must come")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resnet56", choices=["trained", "drawn"], default="trained")
    p.add_argument("--dead-blocks", type=float, default=1 / 3, help="drawn resnet56: share of branches at 0")
    p.add_argument("--train-epochs", type=int, default=10, help="trained resnet56: epochs of sparse training")
    p.add_argument("--train-limit", type=int, default=20000, help="trained resnet56: training images")
    p.add_argument("--train-sparsity", type=float, default=1e-4, help="trained resnet56: L1 lambda (proximal)")
    # 2e-3 for 10 epochs emptied 2 of 27 branches, 5e-3 emptied 8 (docs/results.md)
    p.add_argument("--train-block", type=float, default=5e-3, help="trained resnet56: --sparsity-block lambda")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--finetune-limit", type=int, default=20000)
    p.add_argument("--eval-limit", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="keep checkpoints and ONNX files here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the benchmark comparisons here")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    tp = torch_pruning()
    table, comparisons = [], {}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            if model == "demo":
                src = DEMO
            elif model == "resnet56":
                src = trained_resnet56(args, work) if args.resnet56 == "trained" else drawn_resnet56(args, work)
            else:
                sys.exit(f"unknown model {model!r}: use demo or resnet56")
            ckpt = load_checkpoint(src)
            _, entries = slim_entries(tp, src, args, work, model)
            timing_only = model == "resnet56" and args.resnet56 == "drawn"
            if not timing_only:
                add_accuracy(entries, ckpt, args)
            comparisons[model] = time_all(entries, torch.zeros(1, *ckpt.input_shape), args, work, model)
            table += rows(f"{model} ({args.resnet56})" if model == "resnet56" else model, entries,
                          comparisons[model], args.batches)  # fmt: skip
            print("\n".join(table[-len(entries) :]), flush=True)
    env = next(iter(comparisons.values())).environment if comparisons else {}
    print(f"\n{settings(args, env, tp.__version__)}")
    ups = " | ".join(f"speed-up b{b}" for b in args.batches)
    versus = " | ".join(f"slim2deploy / TP b{b}" for b in args.batches)
    print(
        f"| model | method | MACs | MACs ratio | params | top-1 pruned | top-1 fine-tuned | {ups} | {versus} | note |"
    )
    print("|---|---|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(args.batches)) + "---|")
    print("\n".join(table))
    if args.json:
        atomic_write_text(args.json, json.dumps({k: c.to_dict() for k, c in comparisons.items()}, indent=2))


if __name__ == "__main__":
    main()
