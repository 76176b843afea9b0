"""``pipeline``: shards write | shards index | train | launch | eval | export (| bench).

Expected failures (bad config, missing or bad data, no checkpoint, unreachable launcher, missing optional package)
print one line on stderr and exit non-zero; ``PIPELINE_DEBUG=1`` or ``pipeline --traceback ...`` shows the
traceback. See :mod:`pipeline.errors`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.errors import DEBUG_ENV, debug_requested, exit_code, user_message

METHOD_NAMES = (
    "simclr", "clip", "mocov3", "byol", "barlow_twins", "vicreg", "dino", "mae", "rotnet",
    "dinov2", "ijepa", "jigsaw", "relative_location",
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
            raise SystemExit("pipeline shards write: error: --captions needs labels with class names: --format idx with "
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


def cmd_shards_index(args: argparse.Namespace) -> int:
    from pipeline.data.sources import cache_root, index_source
    from pipeline.data.storage import RetryPolicy

    source = index_source(args.source, cache_dir=args.cache, workers=args.workers, refresh=args.refresh,
                          progress=not args.no_progress, policy=RetryPolicy(args.retries))
    cache = cache_root(args.cache)
    for st in source.streams:
        beside = sum(1 for s in st.shards if s.index and not str(s.index).startswith(str(cache)))
        print(f"{st.spec}: {len(st.shards)} shards, {st.num_samples} samples, fields {st.fields or 'unknown'}; "
              f"DALI indexes: {beside} beside the shards, {len(st.shards) - beside} in {cache / 'index'}")
    print(f"resolved sources cached in {cache / 'sources'}: a run with data.train_shards={args.source!r}"
          f"{f' data.cache_dir={args.cache}' if args.cache else ''} starts without listing or counting")
    return 0


def _run_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if not cfg.run.command:  # recorded in config.yaml and in the export's model card
        cfg.run.command = shlex.join(["pipeline", *args.argv])
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _run_config(args)  # before importing torch: a config mistake is reported at once
    from pipeline.trainer import train

    summary = train(cfg)
    if summary.get("export"):
        print(json.dumps(summary, indent=1))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    from launchers import launch

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
    if s.get("export"):
        print(f"export       {s['export']}  (timm.create_model('local-dir:{s['export']}', pretrained=True))")
    print(f"summary      {path}")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from pipeline.config import config_from_dict
    from pipeline.distributed import DistEnv
    from pipeline.evaluation import evaluate
    from pipeline.export import WEIGHTS, load_exported, model_config_of, read_export_meta

    src = Path(args.model)
    export_dir = src / "export" if (src / "export" / WEIGHTS).exists() else src
    meta = read_export_meta(export_dir)
    encoder = load_exported(export_dir)
    cfg = config_from_dict({})
    cfg.model = model_config_of(export_dir)
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
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml): pass the folder a training "
                                f"run wrote, e.g. runs/<run.name>")
    cfg = load_config(run_dir / "config.yaml")
    from pipeline.checkpoint import CheckpointManager
    from pipeline.distributed import DistEnv
    from pipeline.engines import engine_class
    from pipeline.export import export_encoder
    from pipeline.methods import build_method

    ckpt = Path(args.checkpoint) if args.checkpoint else CheckpointManager(run_dir, DistEnv()).latest()
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no complete checkpoint to export")
    if not (ckpt / "trainer.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no trainer.json)")
    trainer = json.loads((ckpt / "trainer.json").read_text())
    step, world = int(trainer["step"]), int(trainer.get("world_size", 1))
    extra = {"steps": step, "world_size": world, "checkpoint": str(ckpt.resolve()),
             "images_seen": step * cfg.loader.batch_size * cfg.optim.accumulation_steps * world}
    method = build_method(cfg)
    state = engine_class(cfg.engine.name).read_model_state(ckpt, method)
    out = export_encoder(state, cfg, args.output or run_dir / "export", extra=extra,
                         results=_earlier_results(run_dir / "export", ckpt))
    print(f"exported the encoder of {ckpt} to {out.parent} "
          f"(timm.create_model('local-dir:{out.parent}', pretrained=True))")
    return 0


def _earlier_results(export_dir: Path, ckpt: Path) -> dict | None:
    """Evaluation results the run's own export recorded, if they were measured on this checkpoint's weights (the
    trainer evaluates its export at the end): a re-export keeps them on its model card."""
    from pipeline.export import ExportError, read_export_meta

    try:
        meta = read_export_meta(export_dir)
    except ExportError:
        return None
    same = meta.get("checkpoint") and Path(meta["checkpoint"]).resolve() == ckpt.resolve()
    return meta.get("results") if same else None


def _color(value: str) -> str:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a colour: {value!r} (e.g. white, black, '#ffffff')") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true",
                        help=f"show the traceback of expected errors too (same as {DEBUG_ENV}=1), in every rank")
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
    w.add_argument("--background", metavar="COLOR", type=_color,
                   help="composite images with transparency onto this colour (e.g. white) and store them without "
                        "alpha (png unless --image-format); the loaders drop alpha, so transparent pixels would "
                        "show whatever colour they store")
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(fn=cmd_shards_write)

    ix = shards.add_parser(
        "index", help="count samples and write DALI indexes of existing shards (local, s3://, http(s)://, pipe:)",
        description="Write what a run needs and the shards lack: a DALI index file per shard (beside the shards if "
                    "their folder is writable, else in the cache), a manifest.json beside a writable local folder, "
                    "and the resolved source (shard list + counts) in the cache. Reads each shard that has no index "
                    "once, in parallel; never copies data.")
    ix.add_argument("source", help="any data source: folder, brace pattern, s3://..., http(s)://..., pipe:..., "
                                   "several joined by ::")
    ix.add_argument("--cache", help="cache folder (default: $XDG_CACHE_HOME/ssl-pipeline); give the training "
                                    "run the same data.cache_dir")
    ix.add_argument("--workers", type=int, default=16, help="shards read at once")
    ix.add_argument("--retries", type=int, default=3, help="retries of a failing remote read")
    ix.add_argument("--refresh", action="store_true", help="re-resolve even if the cache has this source")
    ix.add_argument("--no-progress", action="store_true")
    ix.set_defaults(fn=cmd_shards_index)

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
    e.add_argument("model", help="run directory or export folder (written by `pipeline export`)")
    e.add_argument("--train-shards", required=True, help="labelled shards: any data source (folder, pattern, URL)")
    e.add_argument("--test-shards", required=True, help="labelled shards: any data source (folder, pattern, URL)")
    e.add_argument("--max-train-samples", type=int, default=0)
    e.add_argument("--baselines", action="store_true", help="also random-init encoder and raw pixels")
    e.add_argument("--output", help="write the results JSON here")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="checkpoint -> a folder timm loads: timm.create_model('local-dir:FOLDER', "
                                      "pretrained=True) (config.json, model.safetensors, README.md model card)")
    x.add_argument("run_dir")
    x.add_argument("--checkpoint", help="checkpoint folder (default: latest)")
    x.add_argument("--output", help="output folder (default: RUN_DIR/export)")
    x.set_defaults(fn=cmd_export)

    from pipeline.bench.cli import add_bench_parser

    add_bench_parser(sub)
    _name_leaf_commands(parser)
    return parser


def _name_leaf_commands(parser: argparse.ArgumentParser) -> None:
    """Give every runnable (sub)command its full name (``pipeline shards write``) for error messages."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(command_name=child.prog)
                _name_leaf_commands(child)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.traceback:
        os.environ[DEBUG_ENV] = "1"  # ranks started in other processes inherit it
    try:
        return args.fn(args)
    except Exception as exc:
        # The one place expected errors become a line on stderr (every subcommand, present and future, goes
        # through here); anything else is a bug and keeps its traceback.
        message = user_message(exc)
        if message is None or debug_requested():
            raise
        print(f"{getattr(args, 'command_name', 'pipeline')}: error: {message}", file=sys.stderr)
        return exit_code(exc)
