"""``pipeline bench MODE``: the argument parser and the driver of each mode (see ``pipeline bench --help``)."""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest.mock import patch

DESCRIPTION = """Throughput benchmarks. Every mode writes <mode>.json (every figure, the resolved config, the
machine, the command), <mode>.md and PNG plots into benchmarks/results/<date>_<hardware>_<model>/ and adds
its command and table to README.md there.

  model     the full training step (any method, any engine) on synthetic batches already on the device;
            images/sec per device and in total, step time, peak memory, MFU (FLOPs counted once with
            FlopCounterMode / datasheet peak); sweeps --batch-sizes x --image-sizes in one call
  loader    images/sec of each loader backend over the same real JPEG shards (pipeline.bench.loader)
  e2e       real shards -> loader -> trainer; fraction of step time spent waiting for data, and throughput
            relative to the same trainer on synthetic batches
  baseline  the trainer against a bare loop (same timm ViT, loss, AdamW, plain DDP, no pipeline code), run
            alternately in the same processes; overhead_ratio = ours / bare step time (target <= 1.05)
  memory    bytes of parameters, master copies, gradients and optimizer state each rank holds under each
            engine (ddp, fsdp, zero1-3), counted tensor by tensor after a few real steps, against DDP; and
            each process's peak RSS above its RSS before the model was built
  scaling   1 vs 2 processes measured here, and a model of the step time at N GPUs x M nodes from the
            measured compute time and the bytes each step moves; prints predicted scaling efficiency

Configuration is the usual tree: --config PRESET plus dotted overrides (model.name=vit_base_patch16_224
engine.precision=bf16 engine.compile=true); bench-only knobs are flags. Timings on a shared machine are noisy:
each mode reports the spread over windows (and repeats), never a single number alone.

On one H100 (the MFU target, >= 45%):
  pipeline bench model model.name=vit_base_patch16_224 engine.precision=bf16 engine.compile=true \\
      --batch-sizes 64,128,256 --image-sizes 224
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.name=vit_base_patch16_224")
    p.add_argument("--config", help="YAML preset (default: the built-in defaults)")
    p.add_argument("--nprocs", type=int, default=1, help="local processes (one GPU each on GPUs; gloo on CPU)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first (allocator, compile, caches)")
    p.add_argument("--steps", type=int, default=steps, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s per device for MFU, e.g. a measured one (default: datasheet table)")
    p.add_argument("--measure-peak", action="store_true",
                   help="measure the peak with a large matmul on each process (gives CPUs an MFU)")
    p.add_argument("--output-root", default="benchmarks/results", help="parent of the results folder")
    p.add_argument("--output", help="exact results folder (default: OUTPUT_ROOT/<date>_<hardware>_<model>)")
    p.add_argument("--no-progress", action="store_true")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: model | loader | e2e | baseline | memory | scaling",
                           description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = bench.add_subparsers(dest="bench_mode", required=True)

    m = modes.add_parser("model", help="training step on synthetic device batches; img/s, MFU, memory; sweeps")
    _common(m, steps=20, warmup=5)
    m.add_argument("--batch-sizes", type=_ints, default=None, help="per-device batch sizes, comma-separated "
                   "(default: loader.batch_size)")
    m.add_argument("--image-sizes", type=_ints, default=None, help="image sizes, comma-separated "
                   "(default: augment.image_size)")
    m.add_argument("--repeats", type=int, default=1, help="run the sweep this many times, reversing the order "
                   "every other time; step time = median over all windows")
    m.set_defaults(fn=cmd_model)

    # Everything after `loader` (--help included) goes to pipeline.bench.loader.main: "+" as the prefix keeps
    # this parser from reading its options.
    lo = modes.add_parser("loader", help="images/sec of each loader backend over the same real JPEG shards "
                          "(`pipeline bench loader --help`)", prefix_chars="+", add_help=False)
    lo.add_argument("rest", nargs="*", help="arguments of pipeline.bench.loader")
    lo.set_defaults(fn=cmd_loader)

    e = modes.add_parser("e2e", help="real shards -> loader -> trainer; data-wait fraction")
    _common(e, steps=20, warmup=10)
    e.add_argument("--shards", help="shards folder (default: data.train_shards)")
    e.add_argument("--backends", default="torch", help="loader backends, comma-separated (torch,dali); a "
                   "synthetic run is added as the reference")
    e.set_defaults(fn=cmd_e2e)

    b = modes.add_parser("baseline", help="trainer vs a bare loop, alternately in one run: overhead_ratio")
    _common(b, steps=20, warmup=10)
    b.add_argument("--repeats", type=int, default=4, help="pairs of runs (order alternates ours/bare)")
    b.set_defaults(fn=cmd_baseline)

    me = modes.add_parser("memory", help="per-rank bytes of parameters, gradients, optimizer state; peak RSS")
    me.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.name=vit_base_patch16_224")
    me.add_argument("--config", help="YAML preset (default: the built-in defaults)")
    me.add_argument("--nprocs", type=int, default=2, help="local processes (one GPU each on GPUs; gloo on CPU)")
    me.add_argument("--steps", type=int, default=3, help="training steps per engine (>= 2); counted before the last")
    me.add_argument("--engines", default="ddp,fsdp,zero1,zero2,zero3", help="ddp, fsdp, zero1, zero2, zero3")
    me.add_argument("--precisions", default="", help="fp32,bf16 (default: engine.precision)")
    me.add_argument("--output-root", default="benchmarks/results", help="parent of the results folder")
    me.add_argument("--output", help="exact results folder (default: OUTPUT_ROOT/<date>_<hardware>_<model>)")
    me.add_argument("--tag", default="", help="write memory_TAG.{json,md} (a variant beside the default run)")
    me.add_argument("--no-progress", action="store_true")
    me.set_defaults(fn=cmd_memory)

    s = modes.add_parser("scaling", help="1 vs 2 processes here + predicted scaling to N GPUs x M nodes")
    _common(s, steps=10, warmup=3)
    s.add_argument("--measure-procs", type=_ints, default=[1, 2], help="process counts measured here ('' skips)")
    s.add_argument("--step-time-s", type=float, default=0.0,
                   help="compute time of one step on one device to predict from (e.g. from `bench model` on "
                        "a GPU); default: the 1-process measurement here")
    s.add_argument("--assume-device", default="", help="predict for this device instead (e.g. H100): compute "
                   "time = counted FLOPs / (datasheet bf16 peak x --assume-mfu)")
    s.add_argument("--assume-mfu", type=float, default=0.45)
    s.add_argument("--engines", default="ddp,fsdp,zero2", help="ddp, fsdp, zero1, zero2, zero3")
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--nodes", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    s.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per GPU per direction in a node")
    s.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU per direction across nodes")
    s.add_argument("--overlap", type=float, default=1.0,
                   help="fraction of backward (forward) time gradient (parameter) collectives can hide under")
    s.set_defaults(fn=cmd_scaling)


# ---------------------------------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace):
    from pipeline.bench.common import hardware_slug
    from pipeline.bench.report import results_dir
    from pipeline.config import load_config
    from pipeline.distributed import DistEnv, pick_device

    cfg = load_config(args.config, args.overrides)
    device = pick_device(DistEnv(), cfg.loader.device)
    out = Path(args.output) if args.output else results_dir(args.output_root, hardware_slug(device), cfg.model.name)
    return cfg, device, out


def _payload(mode: str, args: argparse.Namespace, cfg, device, world: int, rows: list, summary: dict | None = None,
             **extra: Any) -> dict[str, Any]:
    from pipeline.bench.common import environment
    from pipeline.bench.report import command_line
    from pipeline.config import config_to_dict

    flags = {k: v for k, v in vars(args).items() if k not in ("fn", "overrides", "config")}
    return {"mode": mode, "command": command_line(getattr(args, "argv", None)), "environment": environment(device, world),
            "args": flags, "config_file": args.config, "overrides": args.overrides,
            "config": config_to_dict(cfg), "results": rows, "summary": summary or {}, **extra}


def cmd_model(args: argparse.Namespace) -> int:
    from pipeline.bench.common import run_ranks
    from pipeline.bench.model import bench_model_rank
    from pipeline.bench.report import COLUMNS, markdown_table, plot_model, write_mode

    cfg, device, out = _setup(args)
    batch_sizes = args.batch_sizes or [cfg.loader.batch_size]
    image_sizes = args.image_sizes or [cfg.augment.image_size]
    rows = run_ranks(bench_model_rank, cfg, batch_sizes, image_sizes, args.warmup, args.steps, args.peak_tflops,
                     args.measure_peak, not args.no_progress, args.repeats, nprocs=args.nprocs)
    table = markdown_table(rows, COLUMNS["model"])
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    plot_model(rows, out / "model_throughput.png")
    best = max((r for r in rows if "error" not in r), key=lambda r: r["images_per_sec_per_device"], default=None)
    summary = {"best": best}
    path = write_mode(out, "model", _payload("model", args, cfg, device, args.nprocs, rows, summary),
                      {"": table}, ["model_throughput.png"])
    print(f"results: {path}")
    return 0


def cmd_loader(args: argparse.Namespace) -> int:
    try:
        from pipeline.bench import loader
    except ImportError as exc:
        print(f"bench loader: not available in this checkout ({exc}); it lands with the DALI loader "
              f"(pipeline/bench/loader.py)")
        return 1
    return int(loader.main(args.rest) or 0)


def cmd_e2e(args: argparse.Namespace) -> int:
    from pipeline.bench.common import run_ranks
    from pipeline.bench.e2e import bench_e2e_rank
    from pipeline.bench.flops import count_step_flops
    from pipeline.bench.report import COLUMNS, markdown_table, plot_bars, write_mode
    from pipeline.config import ConfigError

    cfg, device, out = _setup(args)
    if args.shards:
        cfg.data.train_shards = args.shards
    if not cfg.data.train_shards:
        raise ConfigError("bench e2e needs real shards: --shards DIR or data.train_shards=DIR")
    backends = [b for b in args.backends.split(",") if b] + ["synthetic"]
    flops = count_step_flops(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        rows = run_ranks(bench_e2e_rank, cfg, backends, args.warmup, args.steps, str(tmp), flops, args.peak_tflops,
                         args.measure_peak, not args.no_progress, nprocs=args.nprocs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown_table(rows, COLUMNS["e2e"])
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    plot_bars(rows, "backend", out / "e2e.png", f"e2e: {cfg.method.name} {cfg.model.name}, "
              f"{args.nprocs} process(es), {cfg.loader.batch_size}/process at {cfg.augment.image_size} px, "
              f"{cfg.loader.num_workers} worker(s)",
              second=("data_wait_fraction", "data wait (% of step time)"))
    summary = {r["backend"]: {k: r.get(k) for k in ("images_per_sec_per_device", "data_wait_fraction", "mfu",
                                                    "throughput_vs_synthetic")} for r in rows if "error" not in r}
    path = write_mode(out, "e2e", _payload("e2e", args, cfg, device, args.nprocs, rows, summary, flops=flops),
                      {"": table}, ["e2e.png"])
    print(f"results: {path}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from pipeline.bench.common import run_ranks
    from pipeline.bench.flops import count_step_flops
    from pipeline.bench.overhead import bench_overhead_rank
    from pipeline.bench.report import COLUMNS, markdown_table, plot_baseline, write_mode

    cfg, device, out = _setup(args)
    cfg.optim.accumulation_steps = 1
    flops = count_step_flops(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    try:
        res = run_ranks(bench_overhead_rank, cfg, args.warmup, args.steps, args.repeats, str(tmp), flops,
                        args.peak_tflops, args.measure_peak, not args.no_progress, nprocs=args.nprocs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows, summary = res["rows"], res["summary"]
    table = markdown_table(rows, COLUMNS["baseline"])
    line = (f"overhead_ratio (ours / bare step time, median of {summary['repeats']} alternating pairs): "
            f"{summary['overhead_ratio']:.3f} (min {summary['overhead_ratio_min']:.3f}, "
            f"max {summary['overhead_ratio_max']:.3f}); ratio of medians {summary['overhead_ratio_of_medians']:.3f}, "
            f"of fastest windows {summary['overhead_ratio_of_fastest_windows']:.3f}; target <= {summary['target_ratio']}")
    print(table)
    print(line)
    out.mkdir(parents=True, exist_ok=True)
    plot_baseline(rows, summary, out / "baseline.png")
    path = write_mode(out, "baseline", _payload("baseline", args, cfg, device, args.nprocs, rows, summary,
                                                overhead_ratio=summary["overhead_ratio"], flops=flops),
                      {"": table}, ["baseline.png"], notes=line)
    print(f"results: {path}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from pipeline.bench.common import run_ranks
    from pipeline.bench.memory import add_ratios, bench_memory_rank, engine_overrides
    from pipeline.bench.report import COLUMNS, markdown_table, write_mode

    cfg, device, out = _setup(args)
    # Spawned ranks start with glibc's mmap threshold pinned (128 KiB unless set): freed tensors go back to the OS
    # at once, instead of staying in the heap once the threshold has risen, so RSS follows live memory.
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    rows = []
    for precision in [p for p in args.precisions.split(",") if p] or [cfg.engine.precision]:
        for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
            run = copy.deepcopy(cfg)
            run.engine.precision = precision
            for key, value in engine_overrides(name).items():
                setattr(run.engine, key, value)
            if not args.no_progress:
                print(f"bench memory: {name}, {precision}, {args.nprocs} process(es)", flush=True)
            with patch.dict(os.environ, {"MALLOC_MMAP_THRESHOLD_": threshold}):  # fresh processes each
                rows += run_ranks(bench_memory_rank, run, args.steps, nprocs=args.nprocs, spawn=True)
    add_ratios(rows)
    table = markdown_table(rows, COLUMNS["memory"])
    print(table)
    notes = ("Bytes each rank holds before the last optimizer step, every storage counted once at its full size "
             "(`Engine.resident_tensors`); MB = 10^6 bytes. `state` = params + master + optim; `x DDP` columns "
             "divide by DDP's figure on the same rank. RSS columns: the process's resident set (when counted, and "
             "its peak) minus its resident set before the model was built, with MALLOC_MMAP_THRESHOLD_="
             f"{threshold}. See pipeline/bench/memory.py.")
    mode = f"memory_{args.tag}" if args.tag else "memory"
    payload = _payload("memory", args, cfg, device, args.nprocs, rows,
                       malloc_mmap_threshold=threshold)
    path = write_mode(out, mode, payload, {"": table}, [], notes=notes)
    print(f"results: {path}")
    return 0


def _scenarios(engines: str, local_loss: bool) -> list[tuple[str, int, bool]]:
    out = []
    for name in engines.split(","):
        name = name.strip()
        if name in ("ddp", "fsdp"):
            out.append((name, 0, local_loss))
        elif name.startswith("zero") and name[4:] in ("1", "2", "3"):
            out.append(("deepspeed", int(name[4:]), local_loss))
        elif name:
            raise ValueError(f"--engines: unknown {name!r} (ddp, fsdp, zero1, zero2, zero3)")
    if out:
        out.append((out[0][0], out[0][1], not local_loss))  # the other loss variant, for contrast
    return out


def cmd_scaling(args: argparse.Namespace) -> int:
    from pipeline.bench.common import run_ranks
    from pipeline.bench.flops import PEAK_FLOPS, count_step_flops, table_peak_flops
    from pipeline.bench.model import bench_model_rank
    from pipeline.bench.report import COLUMNS, markdown_table, plot_scaling, write_mode
    from pipeline.bench.scaling import Interconnect, StepProfile, predict_table
    from pipeline.engines.base import resolve_precision

    cfg, device, out = _setup(args)
    flops = count_step_flops(cfg)
    measured = []
    for n in args.measure_procs:
        rows = run_ranks(bench_model_rank, copy.deepcopy(cfg), [cfg.loader.batch_size], [cfg.augment.image_size],
                         args.warmup, args.steps, args.peak_tflops, args.measure_peak, not args.no_progress,
                         nprocs=n)
        measured.append(rows[0])
    if measured:
        one = next((r for r in measured if r["world_size"] == 1), measured[0])
        for r in measured:
            r["scaling_efficiency"] = r["images_per_sec_per_device"] / one["images_per_sec_per_device"]
    bf16 = resolve_precision(cfg, device) is not None
    if args.step_time_s:
        compute, source = args.step_time_s, "--step-time-s"
    elif args.assume_device:
        peak = table_peak_flops(args.assume_device, __import__("torch").bfloat16)
        if peak is None:
            raise ValueError(f"--assume-device {args.assume_device!r} is not in the peak table ({', '.join(PEAK_FLOPS)})")
        compute = flops["step_flops"] / (peak * args.assume_mfu)
        source, bf16 = f"assumed: {args.assume_device} bf16 at {args.assume_mfu:.0%} MFU", True
    elif measured:
        compute, source = one["step_time_s"], f"measured here ({one['device']}, 1 process)"
    else:
        raise ValueError("no compute time: measure (--measure-procs 1), or give --step-time-s / --assume-device")
    num_params = measured[0]["num_params"] if measured else _count_params(cfg)
    profile = StepProfile(compute_time_s=compute, forward_fraction=flops["forward_flops"] / flops["step_flops"],
                          step_flops=flops["step_flops"], num_params=num_params, batch_size=cfg.loader.batch_size,
                          feature_tensors=2 if cfg.method.name == "simclr" else 0, feature_dim=cfg.method.proj_dim,
                          local_loss=cfg.method.simclr.local_loss, bf16=bf16, source=source)
    ic = Interconnect(args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps)
    pred = predict_table(profile, _scenarios(args.engines, profile.local_loss), args.nodes, ic, args.overlap)
    m_table = markdown_table(measured, COLUMNS["scaling_measured"]) if measured else "(not measured)"
    p_table = markdown_table(pred, COLUMNS["scaling"])
    print("measured on this machine:\n" + m_table)
    print(f"\npredicted (compute time {compute:.4f} s/step, {source}; {ic.gpus_per_node} GPUs/node, "
          f"{ic.intra_node_gbps:g} GB/s intra, {ic.inter_node_gbps:g} GB/s inter per GPU, overlap {args.overlap:g}):")
    print(p_table)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{cfg.method.name} {cfg.model.name}, batch {cfg.loader.batch_size}/device; compute "
             f"{compute * 1e3:.1f} ms ({source}); {ic.intra_node_gbps:g}/{ic.inter_node_gbps:g} GB/s intra/inter")
    plot_scaling(pred, measured, out / "scaling_predicted.png", title)
    summary = {"measured_efficiency_2_procs": next((r["scaling_efficiency"] for r in measured if r["world_size"] == 2),
                                                   None),
               "predicted_efficiency": {f"{r['engine']}/{'local' if r['local_loss'] else 'full'}/{r['world_size']}":
                                        r["scaling_efficiency"] for r in pred}}
    from dataclasses import asdict

    payload = _payload("scaling", args, cfg, device, 1, measured, summary, flops=flops, profile=asdict(profile),
                       interconnect=asdict(ic), overlap=args.overlap, predictions=pred)
    notes = (f"Prediction from compute time {compute:.4f} s/step ({source}), {num_params / 1e6:.1f} M parameters; "
             f"model and formulas: `pipeline/bench/scaling.py`.")
    path = write_mode(out, "scaling", payload, {"measured on this machine": m_table, "predicted": p_table},
                      ["scaling_predicted.png"], notes=notes)
    print(f"results: {path}")
    return 0


def _count_params(cfg) -> int:
    import torch

    from pipeline.methods import build_method

    with torch.device("meta"):
        method = build_method(cfg)
    return sum(p.numel() for p in method.parameters() if p.requires_grad)
