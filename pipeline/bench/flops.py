"""FLOPs of one training step, counted once with ``torch.utils.flop_counter.FlopCounterMode``, and the peak
FLOP/s of the device they are divided by (MFU).

Counting runs the method's forward and backward on the ``meta`` device: no memory, no kernels, a fraction of
a second even for ViT-L, and independent of ``torch.compile`` or the engine's wrapping (which change how fast
the FLOPs run, not how many there are). The optimizer step is not counted, by the usual MFU convention.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config
from pipeline.data.loader import Batch

# Dense (non-sparse) peak FLOP/s by datasheet, per device, per compute dtype. Matched against
# ``torch.cuda.get_device_name()`` in order: the first key contained in the name wins, so specific names
# (``H100 PCIe``) come before generic ones (``H100``). fp32 means TF32 tensor cores where a GPU has them
# (torch's default for convolutions; matmuls use them with ``torch.backends.cuda.matmul.allow_tf32``).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "H100 NVL": {"bf16": 835e12, "fp32": 418e12},
    "H100": {"bf16": 989e12, "fp32": 494.7e12},  # SXM (``NVIDIA H100 80GB HBM3``)
    "H200": {"bf16": 989e12, "fp32": 494.7e12},  # SXM; the same compute as H100 SXM, more memory
    "GH200": {"bf16": 989e12, "fp32": 494.7e12},
    "B200": {"bf16": 2250e12, "fp32": 1100e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
}


def dtype_key(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


def table_peak_flops(device_name: str, dtype: torch.dtype | None) -> float | None:
    """Datasheet peak of ``device_name`` for ``dtype`` (None: not in the table, e.g. CPUs)."""
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return peaks[dtype_key(dtype)]
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None, n: int = 0, seconds: float = 1.0) -> float:
    """Achievable matmul FLOP/s of this device (one process, its current thread count), for ``--measure-peak``:
    a square matmul repeated for about ``seconds``, best of three rounds."""
    dt = dtype or torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b  # warm-up (cuBLAS heuristics, CPU thread pool)
    sync()
    t = time.perf_counter()
    a @ b
    sync()
    reps = max(1, int(seconds / 3 / max(time.perf_counter() - t, 1e-6)))
    best = 0.0
    for _ in range(3):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def count_step_flops(cfg: Config) -> dict[str, float]:
    """FLOPs of one optimizer step of ``cfg``'s method in one process: forward + backward over
    ``loader.batch_size x optim.accumulation_steps`` samples with every view of the recipe.

    Counted single-process: with world size W the contrastive loss scores against W x more keys, a term the
    scaling model (``pipeline.bench.scaling``) adds analytically."""
    from pipeline.methods import build_method, method_recipe

    recipe = method_recipe(cfg)
    b = cfg.loader.batch_size
    with torch.device("meta"):
        method = build_method(cfg)
        batch = Batch([torch.randn(b, 3, v.size, v.size) for v in recipe.views],
                      labels=torch.zeros(b, dtype=torch.long),
                      texts=["a photo"] * b if recipe.with_text else None)
    method.train()
    with FlopCounterMode(display=False) as fwd_counter:
        loss, _ = method(batch)
    forward = fwd_counter.get_total_flops()
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    backward = bwd_counter.get_total_flops()
    accum = cfg.optim.accumulation_steps
    return {"forward_flops": float(forward * accum), "backward_flops": float(backward * accum),
            "step_flops": float((forward + backward) * accum),
            "flops_per_image": float((forward + backward) / b)}


def vit_forward_flops(img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float = 4.0,
                      in_chans: int = 3, class_token: bool = True, batch: int = 1) -> float:
    """Analytic forward FLOPs (2 x multiply-accumulates) of a ViT's matmuls: patch embedding, and per block
    qkv (3ND^2), attention scores and values (2N^2D), projection (ND^2) and MLP (2 r ND^2). Norms, softmax,
    GELU and residual adds are elementwise and left out, as FLOP counters do. ViT-B/16 at 224 px: 35.1 GFLOP."""
    patches = (img_size // patch_size) ** 2
    n = patches + int(class_token)
    d = embed_dim
    embed = patches * (in_chans * patch_size**2) * d
    block = 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * mlp_ratio * n * d * d
    return 2.0 * batch * (embed + depth * block)
