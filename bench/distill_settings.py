"""How to fine-tune a slim model: distillation weight and temperature, and how many epochs.

    python bench/distill_settings.py [--ratio 0.7] [--seeds 0,1] [--epochs 2] [--grid default|full|none]
                                     [--limit-train N]

Prunes the demo model (VGG-11 w0.25, sparse-trained on Fashion-MNIST) at ``--ratio`` with the default
rails, then fine-tunes the slim model on the 60k training images with each setting -- cross-entropy alone,
and distillation from the unpruned model at each weight and temperature -- and, for the chosen setting,
for 1..``--max-epochs`` epochs; prints top-1 on the 10k test images per seed and their mean. This is the
measurement behind ``model/recipe.py``'s DISTILL_WEIGHT, DISTILL_TEMPERATURE and FINETUNE_EPOCHS.
``--limit-train N`` fine-tunes on the first N training images only (a user's small folder); ``--grid none``
compares cross-entropy with the default distillation alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from slim2deploy.base.files import atomic_write_text
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.loop import evaluate
from slim2deploy.model.preprocess import data_for
from slim2deploy.pipeline.finetune import Distill, finetune_checkpoint
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import by_ratio

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "vgg11-w0.25-sparse.pt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.7, help="pruning ratio (default 0.7: a real loss to recover)")
    p.add_argument("--seeds", default="0,1", help="fine-tuning seeds")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of the weight/temperature grid")
    p.add_argument("--max-epochs", type=int, default=4, help="epochs of the epoch sweep (1..N)")
    p.add_argument("--grid", choices=["default", "full", "none"], default="default")
    p.add_argument("--limit-train", type=int, default=None, help="fine-tune on the first N training images")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    weights = (0.5, 0.7, 0.9)
    temps = {"full": (1.0, 2.0, 4.0, 8.0), "default": (2.0, 4.0), "none": ()}[args.grid]
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="distill-settings-") as tmp:
        slim = Path(tmp) / "slim.pt"
        prune_checkpoint(DEMO, slim, by_ratio(args.ratio))
        test = load_checkpoint(DEMO).meta.get("dataset", "fashion-mnist")

        def run(name: str, distill: Distill | None, epochs: int) -> None:
            for seed in seeds:
                out = Path(tmp) / f"{name}-{seed}.pt"
                finetune_checkpoint(slim, out, data=test, epochs=epochs, seed=seed, distill=distill, max_drop=None,
                                    limit_train=args.limit_train, progress=False, log=None, device="cpu")  # fmt: skip
                ckpt = load_checkpoint(out)
                acc = evaluate(model_from_checkpoint(ckpt), data_for(ckpt, test, "val"), 256)[1]
                results.setdefault(name, []).append(acc)
                print(f"{name} seed {seed}: {acc:.2%}", flush=True)

        teacher = model_from_checkpoint(load_checkpoint(DEMO))
        print(f"unpruned: {evaluate(teacher, data_for(load_checkpoint(DEMO), test, 'val'), 256)[1]:.2%}")
        run(f"ce-{args.epochs}ep", None, args.epochs)
        if args.grid == "none":
            run(f"kd-default-{args.epochs}ep", Distill(DEMO), args.epochs)
        for w in weights if temps else ():
            for t in temps:
                run(f"kd-w{w:g}-T{t:g}-{args.epochs}ep", Distill(DEMO, w, t), args.epochs)
        for epochs in range(1, args.max_epochs + 1):
            if epochs != args.epochs:
                run(f"kd-default-{epochs}ep", Distill(DEMO), epochs)
    print("\nsetting                  mean top-1   per seed")
    for name, accs in results.items():
        print(f"{name:<24} {statistics.mean(accs):>9.2%}   {', '.join(f'{a:.2%}' for a in accs)}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"ratio": args.ratio, "seeds": seeds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
