"""slim2deploy build: prune, fine-tune, export, quantise, build engines, benchmark, report."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from slim2deploy.cli.common import (
    BUDGET_RULES,
    OnlyWhen,
    add_selection_args,
    add_target_args,
    add_trust_arg,
    number,
    seed_value,
    selection_from_args,
)

if TYPE_CHECKING:
    from slim2deploy.pipeline.build import BuildConfig


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


ONLY_WHEN = (
    *BUDGET_RULES,
    *(
        OnlyWhen(flag, lambda a: a.finetune_epochs > 0, "to fine-tuning", "add --finetune-epochs N")
        for flag in ("--finetune-lr", "--batch-size", "--limit-train")
    ),
    *(
        OnlyWhen(flag, lambda a: "int8" in a.precision, "to int8 (--precision ...,int8)", "add int8 to --precision")
        for flag in ("--calib-method", "--int8-flavour")
    ),
    *(
        OnlyWhen(flag, lambda a: a.engine != "off", "to TensorRT engines", "drop --engine off")
        for flag in ("--batch", "--workspace-mib", "--builder-opt-level")
    ),
    *(
        OnlyWhen(flag, lambda a: not a.no_bench, "to the benchmark", "drop --no-bench")
        for flag in ("--bench-batch", "--bench-iterations", "--bench-rounds", "--threads")
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
    p.add_argument("--model", required=True, help="sparse-trained checkpoint (from 'slim2deploy train')")
    p.add_argument("--out", default="build", help="output directory")
    add_selection_args(p)
    add_target_args(p)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning after pruning (0: none)")
    g.add_argument("--finetune-lr", type=number(above=0), default=0.01, help="initial lr (cosine schedule)")
    g.add_argument("--batch-size", type=int, default=64, help="fine-tuning images per step")
    g.add_argument("--data", default=None, help="dataset for fine-tuning and accuracy (default: the checkpoint's)")
    g.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    g.add_argument("--limit-train", type=int, default=None, metavar="N", help="fine-tune on the first N images")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N held-out images")
    g = p.add_argument_group("export and precision")
    g.add_argument("--precision", type=_names, default=("fp32",), help="comma-separated: fp32, fp16, int8")
    g.add_argument("--calib", default=None, help="calibration set (.npz) for int8, e.g. calib/fashion-mnist-512.npz")
    g.add_argument(
        "--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"], help="int8 range calibration"
    )
    g.add_argument(
        "--int8-flavour",
        default="tensorrt",
        choices=["tensorrt", "cpu"],
        help="tensorrt: symmetric S8S8 Q/DQ for GPUs; cpu: U8S8 reduce-range for ONNX Runtime CPU",
    )
    g.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's documented one)")
    g = p.add_argument_group("TensorRT engines")
    g.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "require", "off"],
        help="auto: build when TensorRT and a GPU are present; require: fail otherwise",
    )
    g.add_argument("--batch", type=_ints, default=(1, 64), help="engine profile batches (min..max, opt = max)")
    g.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT builder workspace (MiB)")
    g.add_argument("--builder-opt-level", type=int, default=3, help="TensorRT builder optimisation level 0..5")
    g = p.add_argument_group("benchmark (ONNX Runtime CPU)")
    g.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    g.add_argument("--bench-batch", type=_ints, default=(1, 64), help="batch sizes to time")
    g.add_argument("--bench-iterations", type=int, default=200, help="timed iterations per batch and round")
    g.add_argument("--bench-rounds", type=int, default=5, help="interleaved rounds")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: runtime's)")
    p.add_argument(
        "--seed", type=seed_value, default=0, help="seed of fine-tuning and of the images picked for evaluation"
    )
    add_trust_arg(p, input_shape=False)
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
        engine_batches=args.batch,
        workspace_mib=args.workspace_mib,
        builder_opt_level=args.builder_opt_level,
        bench=not args.no_bench,
        bench_batches=args.bench_batch,
        bench_iterations=args.bench_iterations,
        bench_rounds=args.bench_rounds,
        threads=args.threads,
        seed=args.seed,
        trust_pickle=args.trust_pickle,
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
    result = build(config_from_args(args))
    print(f"done: {result.out_dir}/report.md")
    return 0
