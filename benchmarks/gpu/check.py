"""Stage 0 of the GPU run: what is installed, which GPU, and whether every module of the project imports on this
torch. Writes ``env.json``; exits 2 at once, with one sentence, when there is no GPU to measure (unless
``--smoke``), and lists every import that failed (the later stages still run: each fails on its own).

    python benchmarks/gpu/check.py --out RESULTS/env.json [--smoke]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Every module of the project, so an API this torch lacks shows up here in seconds, not in the middle of a stage.
MODULES = [
    "pipeline.cli", "pipeline.trainer", "pipeline.checkpoint", "pipeline.export", "pipeline.evaluation",
    "pipeline.engines.ddp", "pipeline.engines.fsdp", "pipeline.engines.deepspeed", "pipeline.engines.dcp_state",
    "pipeline.losses.gather", "pipeline.data.loader", "pipeline.data.torch_loader", "pipeline.data.dali_loader",
    "pipeline.data.synthetic", "pipeline.data.plan", "pipeline.data.shards",
    "pipeline.bench.model", "pipeline.bench.loader", "pipeline.bench.e2e", "pipeline.bench.flops",
    "launchers.local", "launchers.slurm",
]
# APIs of torch the project calls (newest first where it falls back), checked by attribute.
TORCH_APIS = [
    ("torch.distributed.fsdp", "fully_shard"), ("torch.distributed.fsdp", "MixedPrecisionPolicy"),
    ("torch.distributed.fsdp", "CPUOffloadPolicy"), ("torch.distributed.checkpoint.state_dict", "get_state_dict"),
    ("torch.distributed._functional_collectives", "all_reduce"),
    ("torch.distributed._functional_collectives", "all_gather_tensor_autograd"),
    ("torch.utils.flop_counter", "FlopCounterMode"), ("torch.compiler", "reset"),
]
PACKAGES = ["torch", "torchvision", "timm", "numpy", "PIL", "webdataset", "nvidia.dali", "deepspeed", "submitit",
            "safetensors", "pydantic", "triton"]


def _version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken package is reported, not fatal here
        return f"missing ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return str(getattr(mod, "__version__", "present"))


def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    name, driver, memory, clock = [x.strip() for x in out.splitlines()[0].split(",")]
    return {"name": name, "driver": driver, "memory": memory, "max_sm_clock": clock}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU rehearsal: no GPU needed, no matmul timing")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    info: dict = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.node(),
                  "commit": os.environ.get("PIPELINE_GIT_COMMIT", "unknown"),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "smoke": args.smoke, "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "nvidia_smi": _nvidia_smi()}
    if not torch.cuda.is_available() and not args.smoke:
        info["problems"] = ["torch sees no CUDA GPU: nothing here can be measured"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=1) + "\n")
        print(f"check: {info['problems'][0]} (torch {torch.__version__}, nvidia-smi: {info['nvidia_smi'] or 'none'})")
        return 2
    info["packages"] = {n: _version(n) for n in PACKAGES}
    problems: list[str] = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                     "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "multiprocessors": props.multi_processor_count,
                     "bf16_supported": torch.cuda.is_bf16_supported(),
                     "cudnn": torch.backends.cudnn.version(),
                     "nccl_available": torch.distributed.is_nccl_available()})
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"NCCL version unreadable: {exc}")

    for mod, attr in TORCH_APIS:
        try:
            getattr(importlib.import_module(mod), attr)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"torch {torch.__version__} lacks {mod}.{attr} ({type(exc).__name__})")
    imports = {}
    for mod in MODULES:
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as exc:  # noqa: BLE001
            imports[mod] = f"{type(exc).__name__}: {exc}"
            problems.append(f"import {mod} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    info["imports"] = imports

    if torch.cuda.is_available():
        from pipeline.bench.flops import measure_peak_flops, table_peak_flops

        # The ceiling the MFU figures can be read against: a large bf16 matmul on this very card.
        info["matmul_bf16_tflops"] = round(measure_peak_flops(torch.device("cuda", 0), torch.bfloat16) / 1e12, 1)
        peak = table_peak_flops(info["gpu"], torch.bfloat16)
        info["datasheet_bf16_tflops"] = peak / 1e12 if peak else None
        if peak is None:
            problems.append(f"{info['gpu']} is not in pipeline/bench/flops.py PEAK_FLOPS: MFU will be missing")
    info["problems"] = problems
    info["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1) + "\n")
    gpu = info.get("gpu", "no GPU (smoke)")
    print(f"check: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), Python {info['python']}, "
          f"{info['cpu_count']} CPUs, commit {info['commit']}; matmul bf16 {info.get('matmul_bf16_tflops', '-')} "
          f"TFLOP/s; {len(problems)} problem(s)")
    for p in problems:
        print(f"  - {p}")
    print(json.dumps(info["packages"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
