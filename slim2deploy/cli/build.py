"""slim2deploy build: prune, fine-tune, export, quantise, build engines, benchmark, report."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from slim2deploy.cli.export import add_precision_args
from slim2deploy.cli.flags import (
    add_batch_size_arg,
    add_data_dir_arg,
    add_distill_args,
    add_eval_limit_arg,
    add_max_drop_arg,
    add_seed_arg,
    add_selection_args,
    add_target_args,
    add_trust_arg,
    selection_from_args,
)
from slim2deploy.cli.parser import at_least, number, positive_ints
from slim2deploy.cli.rules import BUDGET_RULES, OnlyWhen
from slim2deploy.model.recipe import FINETUNE_EPOCHS

if TYPE_CHECKING:
    from slim2deploy.pipeline.build import BuildConfig


def _finetunes(args: argparse.Namespace) -> bool:
    return args.data is not None and args.finetune_epochs != 0


ONLY_WHEN = (
    *BUDGET_RULES,
    *(
        OnlyWhen(flag, _finetunes, "to fine-tuning (with --data)", "give --data (and --finetune-epochs above 0)")
        for flag in ("--finetune-lr", "--batch-size", "--limit-train", "--no-distill")
    ),
    *(
        OnlyWhen(flag, lambda a: _finetunes(a) and not a.no_distill, "to distillation", "drop --no-distill")
        for flag in ("--distill-weight", "--distill-temperature")
    ),
    *(
        OnlyWhen(flag, lambda a: "int8" in a.precision, "to int8 (--precision ...,int8)", "add int8 to --precision")
        for flag in ("--calib-method", "--int8-flavour")
    ),
    *(
        OnlyWhen(flag, lambda a: a.engine != "off", "to TensorRT engines", "drop --engine off")
        for flag in ("--engine-batch", "--workspace-mib", "--builder-opt-level")
    ),
    *(
        OnlyWhen(flag, lambda a: not a.no_bench, "to the benchmark", "drop --no-bench")
        for flag in ("--bench-batch", "--bench-iterations", "--bench-rounds", "--bench-warmup-s", "--threads")
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "build",
        help="the whole pipeline: prune, fine-tune, export fp32/fp16/int8, engines, benchmark, report",
        description="Turn a sparse-trained checkpoint into deployable artifacts in --out: slim.pt, plan.json, "
        "baseline/slim ONNX per precision, TensorRT engines (when TensorRT and a GPU are present), "
        "benchmark.{json,md,png} and report.{json,md}. Re-running skips stages whose inputs are unchanged.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="the unpruned checkpoint (from 'train' or 'import')")
    p.add_argument("--out", default="build", help="output directory")
    add_selection_args(p)
    add_target_args(p)
    g = p.add_argument_group("fine-tuning and accuracy")
    g.add_argument(
        "--data", default=None, help="dataset for fine-tuning and accuracy (default: the checkpoint's, for accuracy)"
    )
    add_data_dir_arg(g)
    g.add_argument(
        "--finetune-epochs",
        type=at_least(0),
        default=None,
        help=f"epochs of fine-tuning after pruning (default: {FINETUNE_EPOCHS} with --data, none without; 0: none)",
    )
    g.add_argument(
        "--no-distill",
        action="store_true",
        help="fine-tune on the labels alone (default: distil from the unpruned model as well)",
    )
    add_distill_args(g)
    add_max_drop_arg(g)
    g.add_argument("--finetune-lr", type=number(above=0), default=0.01, help="initial lr (cosine schedule)")
    add_batch_size_arg(g)
    g.add_argument("--limit-train", type=at_least(1), default=None, metavar="N", help="fine-tune on the first N images")
    add_eval_limit_arg(g, deprecated=())
    g = p.add_argument_group("export and precision")
    add_precision_args(g, ("fp32",))
    g.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's documented one)")
    g = p.add_argument_group("TensorRT engines")
    g.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "require", "off"],
        help="auto: build when TensorRT and a GPU are present; require: fail otherwise",
    )
    g.add_argument(
        "--engine-batch",
        type=positive_ints,
        default=(1, 64),
        deprecated=("--batch",),
        help="engine profile batches (min..max, opt = max)",
    )
    g.add_argument("--workspace-mib", type=at_least(1), default=1024, help="TensorRT builder workspace (MiB)")
    g.add_argument("--builder-opt-level", type=int, default=3, help="TensorRT builder optimisation level 0..5")
    g = p.add_argument_group("benchmark (ONNX Runtime CPU: every precision built, against the fp32 baseline)")
    g.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    g.add_argument("--bench-batch", type=positive_ints, default=(1, 64), help="batch sizes to time")
    g.add_argument("--bench-iterations", type=at_least(1), default=200, help="timed iterations per batch and round")
    g.add_argument("--bench-rounds", type=at_least(1), default=5, help="interleaved rounds")
    g.add_argument("--bench-warmup-s", type=number(at_least=0), default=1.0, help="warm-up seconds per model and batch")
    g.add_argument(
        "--threads", type=at_least(1), default=None, help="ONNX Runtime intra-op threads (default: runtime's)"
    )
    add_seed_arg(p, "seed of fine-tuning and of the images picked for evaluation")
    add_trust_arg(p, input_shape_flag=False)
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The ``BuildConfig`` the flags describe (checked by ``pipeline.build.validate``)."""
    from slim2deploy.pipeline.build import BuildConfig

    return BuildConfig(
        model=args.model,
        selection=selection_from_args(args),
        out=args.out,
        fold=not args.no_fold,
        exact=not args.approximate,
        finetune_epochs=args.finetune_epochs,
        distill=not args.no_distill,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        max_drop=args.max_drop,
        finetune_lr=args.finetune_lr,
        batch_size=args.batch_size,
        data=args.data,
        data_dir=args.data_dir,
        limit_train=args.limit_train,
        eval_limit=args.eval_limit,
        precisions=args.precision,
        calib=args.calib,
        calib_method=args.calib_method,
        int8_flavour=args.int8_flavour,
        opset=args.opset,
        engine=args.engine,
        engine_batches=args.engine_batch,
        workspace_mib=args.workspace_mib,
        builder_opt_level=args.builder_opt_level,
        bench=not args.no_bench,
        bench_batches=args.bench_batch,
        bench_iterations=args.bench_iterations,
        bench_rounds=args.bench_rounds,
        bench_warmup_s=args.bench_warmup_s,
        threads=args.threads,
        seed=args.seed,
        trust_code=args.trust_code,
    )


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.errors import SlimError
    from slim2deploy.base.files import check_outputs
    from slim2deploy.deploy.export import check_opset
    from slim2deploy.pipeline.build import build

    if args.save_table:
        raise SlimError("build writes the latency table it uses to OUT/latency-table.json; --save-table is for 'prune'")
    check_outputs(
        {"--out": args.out, "--cache": args.cache},
        folders=["--out", "--cache"],
        inputs=[args.model, args.data, args.calib, args.table],
    )
    check_opset(args.opset)
    result = build(config_from_args(args), log=args._parser.say)
    print(f"done: {result.out_dir}/report.md")
    return 0
