"""Which score should rank the channels: the paper's |gamma| or |gamma| weighted by the readers' weights.

    python bench/importance.py [--model CKPT] [--ratios 0.5,0.7] [--epochs 1] [--seeds 0]

Prunes ``--model`` (default: the demo VGG-11 w0.25, sparse-trained on Fashion-MNIST) at each ratio with
each importance of ``prune.importance.NAMES`` (default rails), evaluates the slim model right after
surgery, then fine-tunes it ``--epochs`` epochs (distilling from the unpruned model, the default) and
evaluates again: top-1 on the checkpoint's test split (Fashion-MNIST: 10k images). Channel counts are
those of the global threshold, so the importances are compared at about the same size; parameters and
MACs are printed so a difference in size shows. Run it on a sparse-trained and on a plainly trained
checkpoint: on the first most gammas are near zero and both scores agree on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from slim2deploy.base.files import atomic_write_text
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.loop import evaluate
from slim2deploy.model.preprocess import data_for
from slim2deploy.model.stats import count_macs
from slim2deploy.pipeline.finetune import Distill, finetune_checkpoint
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.prune.importance import NAMES
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import by_ratio

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "vgg11-w0.25-sparse.pt"


def _accuracy(path: Path, data: str) -> tuple[float, int, int]:
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    acc = evaluate(model, data_for(ckpt, data, "val"), 256)[1]
    params = sum(p.numel() for p in model.parameters())
    return acc, params, count_macs(model, torch.zeros(1, *ckpt.input_shape))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO, help="checkpoint to prune (default: the demo model)")
    p.add_argument("--data", default=None, help="data of the checkpoint (default: the one it records)")
    p.add_argument("--ratios", default="0.5,0.7", help="pruning ratios")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after surgery (0: none)")
    p.add_argument("--seeds", default="0", help="fine-tuning seeds")
    p.add_argument("--no-distill", action="store_true", help="fine-tune on the labels alone")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(2)
    data = args.data or load_checkpoint(args.model).meta.get("dataset", "fashion-mnist")
    seeds = [int(s) for s in args.seeds.split(",")]
    unpruned = _accuracy(args.model, data)[0]
    print(f"unpruned {args.model.name}: {unpruned:.2%}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="importance-") as tmp:
        for ratio in (float(r) for r in args.ratios.split(",")):
            for name in NAMES:
                slim = Path(tmp) / f"{name}-{ratio}.pt"
                prune_checkpoint(args.model, slim, replace(by_ratio(ratio), importance=name))
                pruned, params, macs = _accuracy(slim, data)
                tuned = []
                for seed in seeds if args.epochs else []:
                    out = Path(tmp) / f"{name}-{ratio}-{seed}.pt"
                    distill = None if args.no_distill else Distill(args.model)
                    finetune_checkpoint(slim, out, data=data, epochs=args.epochs, seed=seed, distill=distill,
                                        max_drop=None, progress=False, log=None, device="cpu")  # fmt: skip
                    tuned.append(_accuracy(out, data)[0])
                row = {"ratio": ratio, "importance": name, "params": params, "macs": macs, "pruned": pruned,
                       "tuned": tuned}  # fmt: skip
                rows.append(row)
                after = f"{statistics.mean(tuned):.2%} ({', '.join(f'{a:.2%}' for a in tuned)})" if tuned else "-"
                print(f"ratio {ratio:g} {name:<10} params {params:>9,} MACs {macs / 1e6:7.2f}M  after surgery "
                      f"{pruned:.2%}  after {args.epochs} epoch(s) {after}", flush=True)  # fmt: skip
    if args.json:
        result = {"model": str(args.model), "unpruned": unpruned, "epochs": args.epochs, "rows": rows}
        atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
