"""The study's settings (full, quick, smoke) and one row of its results table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slim2deploy.base.cache import stage_key
from slim2deploy.prune.rails import Rails

RAILS = {"paper": Rails(min_channels=1, max_prune=1.0, round_to=1), "default": Rails()}
# the controls take the slim model's widths as they are: rails that change no count
EXACT_WIDTHS = Rails(min_channels=1, max_prune=1.0, round_to=1)
CACHE_FORMAT = 2  # bumped when what the work dir holds changes shape, so old work dirs are not misread


@dataclass
class ModelSetup:
    """One architecture of the study and its sparse-training settings."""

    arch: str
    width: float
    sparsity: float
    sparsity_mode: str = "proximal"
    sparsity_warmup: float = 0.0
    sparsity_scope: str = "all"  # "prunable": no penalty on gammas the surgery can never remove
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    control_ratios: tuple[float, ...] = (0.5,)  # with the default rails


@dataclass
class StudyConfig:
    models: list[ModelSetup]
    epochs: int = 6  # baseline and sparse training
    ft_epochs: int = 2  # fine-tuning of every pruned model; scratch control trains epochs + ft_epochs
    rails: tuple[str, ...] = ("paper", "default")
    lr: float = 0.1
    schedule: str = "cosine"
    ft_lr: float = 0.01
    ft_schedule: str = "cosine"
    batch_size: int = 64
    limit_train: int | None = None
    limit_val: int | None = None
    seed: int = 0
    threads: int = 2
    bench_batches: tuple[int, ...] = (1, 64)
    bench_iterations: int = 200
    bench_rounds: int = 8
    bench_warmup_s: float = 1.0
    mode: str = "full"
    latency_speedup: float | None = None  # the latency-matched comparison (studylib/latency.py) at this --speedup
    latency_distill: bool = True  # its rows also fine-tuned with distillation (+kd)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self, setup: ModelSetup, sparse: bool = True) -> str:
        """Hash of the training settings; which ratios, rails and benchmarks run does not change a stage.

        ``sparse=False`` leaves out the sparsity settings: the baseline is shared by every lambda.
        """
        d = self.to_dict()
        for k in (
            "models",
            "rails",
            "threads",
            "bench_batches",
            "bench_iterations",
            "bench_rounds",
            "bench_warmup_s",
            "latency_speedup",
            "latency_distill",
        ):
            d.pop(k)
        d.pop("mode")
        skip = {"ratios", "control_ratios"} | (
            set() if sparse else {"sparsity", "sparsity_mode", "sparsity_warmup", "sparsity_scope"}
        )
        d["setup"] = {k: v for k, v in asdict(setup).items() if k not in skip}
        d["cache_format"] = CACHE_FORMAT
        return stage_key(d)[:10]


def full_config(cuda: bool) -> StudyConfig:
    # CPU: widths that train a Fashion-MNIST epoch in about a minute on 2 cores, and the ResNet
    # (1.6x slower per epoch) pruned at 50% only, to stay near 90 minutes; GPU: full width, all ratios.
    return StudyConfig(
        models=[
            # on all 60k images for 6 epochs, lambda 1e-3 leaves ~50% of VGG's gammas below 1e-2
            # (the demo model); the ResNet's residual streams cannot be pruned, so they go unpenalised
            ModelSetup("vgg11", 1.0 if cuda else 0.25, sparsity=1e-3),
            ModelSetup(
                "resnet20",
                1.0 if cuda else 0.5,
                sparsity=1e-3,
                sparsity_scope="prunable",
                ratios=(0.3, 0.5, 0.7) if cuda else (0.5,),
            ),
        ]
    )


def quick_config(cuda: bool) -> StudyConfig:
    return StudyConfig(
        models=[ModelSetup("vgg11", 1.0 if cuda else 0.25, sparsity=2e-3, ratios=(0.5,))],
        epochs=2,
        ft_epochs=1,
        limit_train=10_000,
        limit_val=2_000,
        bench_iterations=30,
        bench_rounds=3,
        mode="quick",
        latency_speedup=2.0,
    )


def smoke_config() -> StudyConfig:
    """For the test suite: seconds, not minutes; the numbers mean nothing."""
    return StudyConfig(
        models=[ModelSetup("vgg11", 0.125, sparsity=2e-3, ratios=(0.5,))],
        epochs=1,
        ft_epochs=1,
        rails=("default",),
        limit_train=500,
        limit_val=250,
        batch_size=32,
        bench_iterations=6,
        bench_rounds=2,
        bench_warmup_s=0.05,
        mode="smoke",
        latency_speedup=1.3,  # at width 0.125 the rails' floor is about 1.6x
    )


@dataclass
class Row:
    """One line of the results table."""

    model: str
    variant: str  # baseline, sparse, slim, own-gamma, scratch
    rails: str | None = None
    ratio: float | None = None
    small_gamma: float | None = None
    acc_pruned: float | None = None  # right after surgery, before any fine-tuning
    acc: float | None = None  # final (after fine-tuning / training)
    params: int = 0
    macs: int = 0
    onnx_bytes: int | None = None
    fp16_acc: float | None = None
    int8_acc: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch -> median ms
    speedup: dict[str, float] = field(default_factory=dict)
    efficiency: dict[str, float | None] = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> str:
        if self.ratio is None:
            return self.variant
        return f"{self.variant}-{self.rails}-{round(self.ratio * 100)}"
