"""torch: a slim2deploy checkpoint (or an in-memory ``nn.Module``) as it would be deployed.

Modes, because "torch latency" means different things:
- ``eager``: the model as trained, BatchNorm and all.
- ``folded``: every Conv followed only by a BatchNorm is replaced by one Conv with the
  BatchNorm folded in (eval statistics), as ONNX export, TensorRT and ONNX Runtime all do at
  load time. Found by tracing with torch.fx (module order is not data flow: a pre-activation
  block's last conv feeds a residual add, not the next block's BatchNorm), checked against the
  unfolded model on a random input before it is used.
- ``compiled``: the folded graph through ``torch.compile`` (inductor, weights frozen as
  constants), specialised per batch size; ``compile_mode`` picks inductor's preset.

Each runs fp32 or fp16 (fp16 on CUDA only: CPU fp16 convs are slow emulation, not a deployment
target) and optionally channels_last. ``cuda_graph`` removes the launch overhead that dominates
small batches: eager and folded models are captured once per batch size and replayed (the
PyTorch "CUDA Graphs" recipe: warm up on a side stream, capture, copy into the static input,
replay); a compiled model uses inductor's own CUDA graphs (``triton.cudagraphs``).
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.stats import count_macs, count_params, image_bytes
from slim2deploy.prune.rebuild import rebuild
from slim2deploy.runtime.base import Runner, RunnerInfo
from slim2deploy.runtime.registry import COMPILE_MODES, TORCH_MODES

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# folding reorders float arithmetic; measured ~1e-6 relative on the zoo models
FOLD_RTOL = 1e-4


def fuse_conv_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval mode) with each Conv -> BatchNorm pair fused into one Conv; (model, pairs)."""
    model = copy.deepcopy(model).eval()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable Python
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SlimError(f"cannot fold Conv+BN: torch.fx cannot trace the model ({first}); use mode eager") from exc
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = 0
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules[src.target], _CONVS)):
            continue
        # a conv whose output is also used elsewhere, or a module called twice, must keep its own weights
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        gm.set_submodule(str(src.target), fuse_conv_bn_eval(modules[src.target], bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        pairs += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, pairs


class TorchRunner(Runner):
    """A checkpoint path (or an ``nn.Module`` with ``input_shape``) run by torch in one of TORCH_MODES."""

    kind = "torch"
    library = "torch"

    def __init__(
        self,
        source: str | os.PathLike[str] | nn.Module,
        device: str = "cpu",
        precision: str = "fp32",
        mode: str = "eager",
        channels_last: bool = False,
        cuda_graph: bool = False,
        compile_mode: str = "default",
        threads: int | None = None,
        trust_code: bool = False,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.module = source if isinstance(source, nn.Module) else None
        options = {
            "device": device,
            "precision": precision,
            "mode": mode,
            "channels_last": channels_last,
            "cuda_graph": cuda_graph,
            "compile_mode": compile_mode,
            "threads": threads,
            "trust_code": trust_code,
        }
        super().__init__(None if self.module is not None else source, options)  # type: ignore[arg-type]
        if precision not in ("fp32", "fp16"):
            raise SlimError(f"torch precision must be fp32 or fp16, got {precision!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise SlimError(f"torch device must be auto, cpu or cuda, got {device!r}")
        if mode not in TORCH_MODES:
            raise SlimError(f"unknown torch mode {mode!r}; use one of {', '.join(TORCH_MODES)}")
        if compile_mode not in COMPILE_MODES:
            raise SlimError(f"unknown torch.compile mode {compile_mode!r}; use one of {', '.join(COMPILE_MODES)}")
        if self.module is not None and input_shape is None:
            raise SlimError("an in-memory model needs input_shape (C, H, W) to be run")
        self.device = device
        self.precision = precision
        self.mode = mode
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.compile_mode = compile_mode
        self.threads = threads
        self.trust_code = trust_code
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self._model: Any = None
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._compiled_batches: set[int] = set()
        self.params: int | None = None
        self.macs: int | None = None
        self._sample_bytes: int | None = None

    def _load(self) -> tuple[nn.Module, tuple[int, ...]]:
        if self.module is not None:
            assert self.input_shape is not None
            return self.module.eval(), self.input_shape
        assert self.path is not None
        ckpt = load_checkpoint(self.path, trust_code=self.trust_code)
        sample_shape = tuple(int(d) for d in ckpt.input_shape)
        if not all(sample_shape):
            raise SlimError(f"{self.name} does not record its input shape; save it as a slim2deploy checkpoint")
        rebuilt = rebuild(ckpt, trust_code=self.trust_code)
        self._sample_bytes = rebuilt.bytes_per_image()  # measured by the pass that checked the checkpoint
        return rebuilt.model.eval(), sample_shape

    def _prepare(self, model: nn.Module, sample_shape: tuple[int, ...], device: str) -> tuple[nn.Module, int]:
        """The model as the mode deploys it, on its device, dtype and memory format."""
        pairs = 0
        if self.mode in ("folded", "compiled"):
            folded, pairs = fuse_conv_bn(model)
            weight = next(model.parameters(), None)
            probe = torch.randn(2, *sample_shape, generator=torch.Generator().manual_seed(0))
            probe = probe.to(weight.device) if weight is not None else probe
            with torch.no_grad():
                ref, out = model(probe), folded(probe)
            err = float((out - ref).abs().max())
            if not err <= FOLD_RTOL * float(ref.abs().max()) + 1e-6:
                raise SlimError(f"folding Conv+BN changed {self.name}'s outputs by {err:.3g}; use mode eager")
            model = folded
        elif self.module is not None and (device != "cpu" or self.precision != "fp32" or self.channels_last):
            model = copy.deepcopy(model)  # moving or casting an nn.Module is in place: leave the caller's alone
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(self._torch_device, dtype=self._dtype).to(memory_format=fmt).eval()
        if self.mode == "compiled":
            from torch._inductor import list_mode_options

            preset = self.compile_mode
            if device != "cuda":
                preset = "max-autotune-no-cudagraphs" if preset.startswith("max-autotune") else "default"
            options = {**list_mode_options(preset), "freezing": True}
            options["triton.cudagraphs"] = bool(self.cuda_graph and device == "cuda") or bool(
                options.get("triton.cudagraphs")
            )
            model = torch.compile(model, backend="inductor", dynamic=False, options=options)  # type: ignore[assignment]
        return model, pairs

    def _activate(self) -> RunnerInfo:
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SlimError("torch sees no CUDA GPU here; use the cpu `device`")
        if device == "cpu" and (self.precision == "fp16" or self.cuda_graph):
            raise SlimError("fp16 and CUDA graphs need the cuda device; drop them or use the cuda `device`")
        if self.threads:
            torch.set_num_threads(self.threads)
        model, sample_shape = self._load()
        self.params = count_params(model)
        self.macs = count_macs(model, torch.zeros(1, *sample_shape))
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._torch_device = torch.device(device)
        self._model, pairs = self._prepare(model, sample_shape, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats(self._torch_device)
        return RunnerInfo(
            backend=self.library or self.kind,
            path=str(self.path) if self.path is not None else "",
            input_name="input",
            sample_shape=sample_shape,
            input_dtype="float32",
            min_batch=1,
            max_batch=None,
            device=device,
            precision=self.precision,
            options={
                "mode": self.mode,
                "folded_conv_bn": pairs,
                "compile_mode": self.compile_mode if self.mode == "compiled" else None,
                "channels_last": self.channels_last,
                "cuda_graph": self.cuda_graph,
                "threads": torch.get_num_threads(),
                "torch": str(torch.__version__),
            },
        )

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).to(self._torch_device, dtype=self._dtype, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _graph_for(self, batch: int, example: torch.Tensor) -> tuple[Any, Any, Any]:
        if batch not in self._graphs:
            static_in = example.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # warm-up on a side stream, as capture requires (lazy init of cuDNN handles etc.)
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._model(static_in)
            self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]

    def _forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode != "compiled" or t.shape[0] in self._compiled_batches:
            return self._model(t)
        try:  # compilation happens on the first call at each batch size
            out = self._model(t)
        except Exception as exc:  # noqa: BLE001 - dynamo/inductor raise many types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise SlimError(
                f"torch.compile failed on {self.name} at batch {t.shape[0]} ({first}); use mode folded"
            ) from exc
        self._compiled_batches.add(t.shape[0])
        return out

    def _infer(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = self._to_device(x)
            if self._torch_device.type != "cuda":
                return self._forward(t).float().numpy()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self.cuda_graph and self.mode != "compiled":
                graph, static_in, static_out = self._graph_for(x.shape[0], t)
                static_in.copy_(t)
                start.record()
                graph.replay()
                end.record()
                out = static_out
            else:
                start.record()
                out = self._forward(t)
                end.record()
            host = out.float().cpu().numpy()  # the copy back synchronises the stream
            self.last_compute_ms = start.elapsed_time(end)
            return host

    def sample_bytes(self) -> int | None:
        if self._sample_bytes is None and self.module is not None and self.input_shape is not None:
            self._sample_bytes = image_bytes(self.module, self.input_shape)
        return self._sample_bytes

    def memory(self) -> dict[str, int]:
        if not self.is_active or self._torch_device.type != "cuda":
            return {}
        return {"torch_max_memory_allocated": int(torch.cuda.max_memory_allocated(self._torch_device))}

    def costs(self) -> tuple[dict[str, int], str]:
        if self.params is None:
            return super().costs()
        return {"params": self.params, "macs": self.macs or 0}, "torch"

    def _deactivate(self) -> None:
        self._graphs.clear()
        self._compiled_batches.clear()
        self._model = None
