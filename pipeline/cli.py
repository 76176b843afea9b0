"""``pipeline``: shards write | train | launch | eval | export (| bench)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config

METHOD_NAMES = (
    "simclr", "clip", "mocov3", "byol", "barlow_twins", "vicreg", "dino", "mae", "rotnet",
    "jigsaw", "relative_location",
)
"""``method.name`` values for the help text, kept here so ``--help`` does not import torch and timm; a test holds it
equal to ``pipeline.methods.METHODS``."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset (configs/quickstart.yaml, configs/<method>.yaml for CPU, "
                                  "configs/<method>_vits16.yaml and _vitb16.yaml for GPUs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 loader.batch_size=128 method=byol")
    p.epilog = f"methods (method=NAME): {', '.join(METHOD_NAMES)}"


def cmd_shards_write(args: argparse.Namespace) -> int:
    from pipeline.data import shards as S

    classes: list[str] = []
    if args.format == "idx":
        if not args.labels:
            print("note: no --labels given; shards will have no cls field", file=sys.stderr)
        items, total = S.idx_items(args.input, args.labels)
        if args.classes == "fashion-mnist":
            classes = S.FASHION_MNIST_CLASSES
    elif args.format == "folder":
        items, total, classes = S.folder_items(args.input)
    else:
        items, total = S.caption_items(args.input)
    if args.captions is not None:
        if args.format == "captions" or not classes or (args.format == "idx" and not args.labels):
            raise SystemExit("pipeline shards write: --captions needs labels with class names: --format idx with "
                             "--labels and --classes, or --format folder with class sub-folders")
        from pipeline.config import FMNIST_TEMPLATES

        items = S.class_captions(items, classes, args.captions or FMNIST_TEMPLATES)
    manifest = S.write_shards(
        items, args.output, shard_size=args.shard_size, max_shard_bytes=int(args.max_shard_mb * 2**20),
        image_format=args.image_format, background=args.background, total=total, source=str(args.input),
        classes=classes, progress=not args.no_progress,
    )
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.output} "
          f"({manifest['num_skipped']} skipped)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if summary.get("export"):
        print(json.dumps(summary, indent=1))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from launchers import launch

    cfg = load_config(args.config, args.overrides)
    code = launch(cfg, dry_run=args.dry_run, wait=args.wait)
    if cfg.launcher.name == "local" and not args.dry_run:
        print_summary(cfg.run.dir / "summary.json")
    return code


def print_summary(path: Path) -> None:
    if not path.exists():
        return
    s = json.loads(path.read_text())
    print("\n=== summary ===")
    if "linear_probe" in s:
        print(f"{'':14s}{'pretrained':>12s}{'random init':>13s}{'raw pixels':>12s}")
        for metric in ["linear_probe"] + [m for m in s if m.startswith("knn_k")]:
            row = s[metric]
            label = f"kNN k={metric[5:]}" if metric.startswith("knn_k") else metric
            print(f"{label:14s}" + "".join(f"{row[k] * 100:>{w}.1f}%" if k in row else f"{'-':>{w + 1}s}"
                                           for k, w in (("pretrained", 11), ("random_init", 12), ("raw_pixels", 11))))
        print(f"(fitted on {s['num_train']} samples, scored on {s['num_test']}; kNN votes at T="
              f"{s.get('knn_temperature', 0.07)})")
    if "images_per_sec" in s:
        print(f"throughput   {s['images_per_sec']:.0f} images/s ({s['images_per_sec_per_process']:.0f} per process, "
              f"{s['world_size']} processes)")
    print(f"final loss   {s.get('final_loss', float('nan')):.4f} after {s['steps']} steps")
    print(f"checkpoint   {s.get('checkpoint')}")
    print(f"export       {s.get('export')}  (loads into timm, see config.json there)")
    print(f"summary      {path}")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from pipeline.config import config_from_dict
    from pipeline.distributed import DistEnv
    from pipeline.evaluation import evaluate
    from pipeline.export import load_exported, model_config_of

    src = Path(args.model)
    export_dir = src / "export" if (src / "export" / "model.safetensors").exists() else src
    encoder = load_exported(export_dir)
    cfg = config_from_dict({})
    cfg.model = model_config_of(export_dir)
    meta = json.loads((export_dir / "config.json").read_text())
    cfg.augment.image_size = meta["image_size"]
    cfg.augment.mean, cfg.augment.std = tuple(meta["mean"]), tuple(meta["std"])
    cfg.data.eval_train_shards, cfg.data.eval_test_shards = args.train_shards, args.test_shards
    cfg.eval.max_train_samples, cfg.eval.baselines = args.max_train_samples, args.baselines
    results = evaluate(cfg, encoder, DistEnv(), torch.device("cpu"))
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import CheckpointManager
    from pipeline.config import load_config as _load
    from pipeline.distributed import DistEnv
    from pipeline.engines import engine_class
    from pipeline.export import export_encoder
    from pipeline.methods import build_method

    run_dir = Path(args.run_dir)
    cfg = _load(run_dir / "config.yaml")
    ckpt = Path(args.checkpoint) if args.checkpoint else CheckpointManager(run_dir, DistEnv()).latest()
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no complete checkpoint to export")
    method = build_method(cfg)
    state = engine_class(cfg.engine.name).read_model_state(ckpt, method)
    out = export_encoder(state, cfg, args.output or run_dir / "export", extra={"checkpoint": str(ckpt)})
    print(f"exported the encoder of {ckpt} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write WebDataset shards").add_subparsers(dest="shards_cmd", required=True)
    w = shards.add_parser("write", help="images/arrays/captions -> tar shards + DALI index + manifest.json")
    w.add_argument("--format", choices=["folder", "idx", "captions"], required=True,
                   help="folder: image folder (class sub-folders optional); idx: IDX arrays (Fashion-MNIST); "
                        "captions: images with sibling .txt captions")
    w.add_argument("--input", required=True, help="folder, or IDX images file")
    w.add_argument("--labels", help="IDX labels file (format idx)")
    w.add_argument("--classes", help="class names preset for idx (fashion-mnist)")
    w.add_argument("--captions", nargs="*", metavar="TEMPLATE",
                   help="also write a txt caption per sample from its class name, e.g. --captions 'a photo of a "
                        "{}.' (sample i takes template i mod n); given alone, the zero-shot templates of "
                        "method.clip.zero_shot_templates. Labelled sources only (idx --classes, class folders)")
    w.add_argument("--output", required=True)
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    w.add_argument("--max-shard-mb", type=float, default=0, help="also close a shard past this size (0: off)")
    w.add_argument("--image-format", choices=["png", "jpg"], default=None,
                   help="re-encode images (default: keep the source bytes; arrays become png)")
    w.add_argument("--background", metavar="COLOR",
                   help="composite images with transparency onto this colour (e.g. white) and store them without "
                        "alpha (png unless --image-format); the loaders drop alpha, so transparent pixels would "
                        "show whatever colour they store")
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(fn=cmd_shards_write)

    t = sub.add_parser("train", help="train in this process (one rank; use torchrun or `launch` for more)")
    _add_config_args(t)
    t.set_defaults(fn=cmd_train)

    la = sub.add_parser("launch", help="launch a job: launcher=local|slurm|ray")
    _add_config_args(la)
    la.add_argument("--dry-run", action="store_true", help="print what would be submitted (slurm: the sbatch script)")
    la.add_argument("--wait", action="store_true",
                    help="slurm: follow the submitted job, streaming rank 0's log, until it ends (local and ray runs "
                         "always stay in the foreground: a Ray Train run ends with its driver)")
    la.set_defaults(fn=cmd_launch)

    e = sub.add_parser("eval", help="kNN + linear probe of an exported encoder on labelled shards")
    e.add_argument("model", help="run directory or export folder (model.safetensors + config.json)")
    e.add_argument("--train-shards", required=True)
    e.add_argument("--test-shards", required=True)
    e.add_argument("--max-train-samples", type=int, default=0)
    e.add_argument("--baselines", action="store_true", help="also random-init encoder and raw pixels")
    e.add_argument("--output", help="write the results JSON here")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="checkpoint -> model.safetensors + config.json (timm keys)")
    x.add_argument("run_dir")
    x.add_argument("--checkpoint", help="checkpoint folder (default: latest)")
    x.add_argument("--output", help="output folder (default: RUN_DIR/export)")
    x.set_defaults(fn=cmd_export)

    from pipeline.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
