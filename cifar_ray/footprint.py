"""What a model costs where it will run: its parameters, its FLOPs per image and the latency of
its ONNX export (what `cifar_ray.export` writes) under ONNX Runtime on this machine: a warm-up,
then the median of timed runs at batch 1 and at a batch size of the user's."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from cifar_ray.data.augment import Standardize
from cifar_ray.errors import UserError
from cifar_ray.model import averaged_views
from cifar_ray.module import LitResNet9

INPUT, OUTPUT = "images", "probabilities"
# Timed runs: WARMUP first, then up to REPEATS; past MAX_SECONDS (warm-up included) it stops
# at the next run (at least one timed run).
WARMUP, REPEATS, MAX_SECONDS = 5, 30, 10.0


class Deployable(nn.Module):
    """ResNet-9 with its normalisation in front, its test-time flips (eval.tta) and
    probabilities out."""

    def __init__(self, module: LitResNet9):
        super().__init__()
        self.standardize = Standardize(module.normalization)
        self.model = module.model
        self.image_size = module.image_size
        self.tta = module.tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, s, s) in [0, 1]
        return averaged_views(self.model, self.standardize(images), self.tta).exp()


def onnx_program(model: Deployable):
    """torch's ONNX export of `model`, its batch dimension left free."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript: "
                        "pip install 'cifar_ray[export]'") from None
    example = torch.rand(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        return torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=[INPUT],
                                 output_names=[OUTPUT], verbose=False,
                                 dynamic_shapes={"images": {0: torch.export.Dim("batch")}})


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: Deployable) -> float:
    """Forward FLOPs of one image (2 per multiply-add, every test-time view), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, model.image_size, model.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return float(counter.get_total_flops())


def onnx_latency_ms(onnx: bytes, size: int, batches: list[int], threads: int = 1) -> list[float]:
    """Milliseconds per call of the ONNX model `onnx` at each batch size, on `threads` CPU
    threads: WARMUP calls, then the median of up to REPEATS timed ones."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        raise UserError("latency needs ONNX Runtime: pip install 'cifar_ray[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    found = []
    for batch in batches:
        images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        began = time.perf_counter()
        for _ in range(WARMUP):
            if time.perf_counter() - began > MAX_SECONDS:
                break
            session.run(None, {INPUT: images})
        times: list[float] = []
        while not times or (len(times) < REPEATS
                            and time.perf_counter() - began < MAX_SECONDS):
            start = time.perf_counter()
            session.run(None, {INPUT: images})
            times.append(time.perf_counter() - start)
        found.append(1000 * statistics.median(times))
    return found


def measure(module: LitResNet9, latency_batch: int | None = None, threads: int = 1,
            onnx: bytes | None = None) -> dict[str, Any]:
    """{"params", "flops"} of `module`, and with `latency_batch` (an int) "latency_ms" (batch 1)
    and "batch_latency_ms" (that batch) of its ONNX export (`onnx`, else exported here)."""
    # A copy: eval() on the module itself would leave a trial training with its BatchNorm
    # frozen (Lightning keeps each module's mode), and the draws here not the trial's.
    with torch.random.fork_rng(devices=[]):
        model = Deployable(copy.deepcopy(module).cpu()).eval()
        found: dict[str, Any] = {"params": parameters(model), "flops": flops_per_image(model)}
        if latency_batch:
            if onnx is None:
                onnx = onnx_program(model).model_proto.SerializeToString()
            one, batch = onnx_latency_ms(onnx, model.image_size, [1, latency_batch], threads)
            found.update(latency_ms=one, batch_latency_ms=batch)
    return found
