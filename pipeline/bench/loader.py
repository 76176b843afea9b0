"""``pipeline bench loader``: images/sec of the DALI and torch loader backends over the same real JPEG photos,
same recipe, same CPU cores, measured in one run.

``--device cuda`` delivers every batch on the GPU: DALI decodes there (``mixed``: nvJPEG, the hardware JPEG
decoder where the GPU has one) and augments there; the torch backend decodes and augments in DataLoader workers
on the CPU cores and copies pinned batches over. ``--repeat K`` lists every shard K times (links, no copies) so
an epoch of the benchmark set lasts as long as a corpus-sized one (see ``repeat_shards``).

Photos: the wallpapers of a Debian package (``apt-get download lomiri-wallpapers-16.04``, ``dpkg -x``), cut at
run time into 500x375 JPEG tiles (at a few scales, so tiles differ) and written as WebDataset shards. Nothing of
them is committed. Results: ``benchmarks/results/loader.json`` (one entry per backend) and ``loader.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

WALLPAPER_PACKAGE = "lomiri-wallpapers-16.04"
TILE = (500, 375)


def fetch_photos(dest: Path, package: str = WALLPAPER_PACKAGE) -> list[Path]:
    """Download and unpack a Debian wallpaper package into ``dest`` (once); returns its JPEG photos."""
    root = dest / package
    if not root.exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", package], cwd=dest, check=True, capture_output=True)
        deb = next(dest.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    photos = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        raise FileNotFoundError(f"no JPEG photos in {root}")
    return photos


def cut_tiles(photos: list[Path], out: Path, count: int, tile: tuple[int, int] = TILE, quality: int = 90) -> Path:
    """Up to ``count`` tile-sized JPEGs cut from the photos at scales 1, 1/2, 3/4, 0.9, 0.6 (raises if fewer fit)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for scale in (1.0, 0.5, 0.75, 0.9, 0.6):
        for photo in photos:
            with Image.open(photo) as img:
                img = img.convert("RGB")
                if scale != 1:
                    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BILINEAR)
                for top in range(0, img.height - tile[1] + 1, tile[1]):
                    for left in range(0, img.width - tile[0] + 1, tile[0]):
                        img.crop((left, top, left + tile[0], top + tile[1])).save(out / f"{n:06d}.jpg", quality=quality)
                        n += 1
                        if n >= count:
                            return out
    raise ValueError(f"only {n} tiles of {tile} fit in {len(photos)} photos; ask for fewer")


def prepare_shards(workdir: Path, count: int, photos_dir: str | None = None) -> Path:
    from pipeline.data.shards import folder_items, write_shards

    shards = workdir / f"shards-{count}"
    if (shards / "manifest.json").exists():
        return shards
    photos = (sorted(p for p in Path(photos_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
              if photos_dir else fetch_photos(workdir / "debs"))
    tiles = cut_tiles(photos, workdir / f"tiles-{count}", count)
    items, total, _ = folder_items(tiles)
    write_shards(items, shards, shard_size=256, total=total, progress=False)  # keeps the JPEG bytes as cut
    return shards


def repeat_shards(src: str | Path, dst: str | Path, times: int) -> Path:
    """A shard folder ``dst`` that lists every shard of ``src`` ``times`` times, as hard links (symbolic links
    across file systems) with their DALI indexes, and a manifest to match.

    Both loaders pay a start-up cost at every epoch (DALI builds a pipeline and fills its shuffle buffer, torch
    forks its workers): over a few thousand benchmark images an epoch lasts a handful of steps and that cost
    would dominate, where on a real corpus it falls once in thousands of steps. Every sample stays a real JPEG
    decoded from its own bytes; only the epoch is longer. Keys repeat across the copies, which no loader minds."""
    from pipeline.data.shards import open_shards

    src, dst = Path(src), Path(dst)
    if (dst / "manifest.json").exists():
        return dst
    manifest = open_shards(src).manifest
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for k in range(times):
        for entry in manifest["shards"]:
            copy = dict(entry, file=f"r{k:03d}-{entry['file']}", index=f"r{k:03d}-{entry['index']}")
            for field in ("file", "index"):
                target = (src / entry[field]).resolve()
                try:
                    os.link(target, tmp / copy[field])
                except OSError:
                    os.symlink(target, tmp / copy[field])
            shards.append(copy)
    manifest = dict(manifest, shards=shards, num_samples=manifest["num_samples"] * times,
                    source=f"{manifest.get('source') or src} x{times}")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _measure(loader, warmup: int, batches: int, device=None) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    if device is not None:
        _sync(device)  # batches still being copied or augmented on the GPU belong to the warm-up
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it).size
    if device is not None:
        _sync(device)
    return n / (time.perf_counter() - start)


def bench_loader(shards: str | Path, *, backends: tuple[str, ...] = ("dali", "torch"), image_size: int = 224,
                 batch_size: int = 64, cpu_cores: int = 2, recipe: str = "simclr", warmup: int = 3,
                 batches: int = 24, repeats: int = 2, device: str = "cpu") -> list[dict[str, Any]]:
    """Images/sec of each backend on ``shards``: ``cpu_cores`` DataLoader workers / DALI threads, the process
    pinned to that many cores, batches delivered on ``device`` (``cuda``: DALI decodes and augments on the GPU),
    runs alternated ``repeats`` times; the median is reported."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data.loader import build_loader
    from pipeline.data.recipes import build_recipe
    from pipeline.distributed import DistEnv

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpu_cores])
    torch.set_num_threads(1)  # the main process only collates; the work is in workers / DALI threads
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    rates: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            cfg = config_from_dict({
                "data": {"train_shards": str(shards)},
                "loader": {"backend": backend, "batch_size": batch_size, "num_workers": cpu_cores},
                "augment": {"recipe": recipe, "image_size": image_size},
            })
            loader = build_loader(cfg, DistEnv(), dev, build_recipe(cfg.augment))
            rates[backend].append(_measure(loader, warmup, batches, dev))
            del loader
    views = len(build_recipe(config_from_dict({"augment": {"recipe": recipe, "image_size": image_size}}).augment).views)
    out = []
    for backend, rs in rates.items():
        out.append({
            "backend": backend, "image_size": image_size, "cpu_cores": cpu_cores,
            "images_per_sec": round(statistics.median(rs), 1), "runs_images_per_sec": [round(r, 1) for r in rs],
            "recipe": recipe, "views": views, "batch_size": batch_size, "device": dev.type,
            "decode": ("mixed (GPU)" if dev.type == "cuda" else "cpu") if backend == "dali" else "PIL (CPU workers)",
        })
    return out


def markdown_table(results: list[dict[str, Any]], note: str = "") -> str:
    base = {r["image_size"]: r["images_per_sec"] for r in results if r["backend"] == "torch"}
    lines = ["| backend | decode | image_size | cpu_cores | recipe (views) | batch | images/sec | vs torch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ratio = f"{r['images_per_sec'] / base[r['image_size']]:.2f}x" if r["image_size"] in base else "-"
        lines.append(f"| {r['backend']} | {r.get('decode', '-')} | {r['image_size']} | {r['cpu_cores']} | "
                     f"{r['recipe']} ({r['views']}) | {r['batch_size']} | {r['images_per_sec']:.1f} | {ratio} |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline bench loader", description=__doc__)
    p.add_argument("--images", type=int, default=1024, help="JPEG tiles to cut and shard")
    p.add_argument("--image-size", type=int, nargs="+", default=[224])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu-cores", type=int, default=2)
    p.add_argument("--recipe", default="simclr")
    p.add_argument("--batches", type=int, default=24, help="measured batches per run (after 3 warm-up batches)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["dali", "torch"])
    p.add_argument("--photos", help="folder of JPEG photos to cut (default: download the Debian wallpapers)")
    p.add_argument("--workdir", help="where photos, tiles and shards go (default: a temporary folder); shards "
                   "already there (WORKDIR/shards-IMAGES/manifest.json) are used as they are")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where batches are delivered; cuda: "
                   "DALI decodes (mixed) and augments on the GPU, torch copies its batches there")
    p.add_argument("--repeat", type=int, default=1, help="list every shard this many times (links), so an epoch "
                   "outlasts the measurement as on a real corpus")
    p.add_argument("--output", default="benchmarks/results", help="folder for loader.json and loader.md")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        workdir = Path(args.workdir or tmp)
        shards = prepare_shards(workdir, args.images, args.photos)
        if args.repeat > 1:
            shards = repeat_shards(shards, workdir / f"shards-{args.images}-x{args.repeat}", args.repeat)
        results = []
        for size in args.image_size:
            results += bench_loader(shards, backends=tuple(args.backends), image_size=size, batch_size=args.batch_size,
                                    cpu_cores=args.cpu_cores, recipe=args.recipe, batches=args.batches,
                                    repeats=args.repeats, device=args.device)
    import torch

    from pipeline.bench.common import environment

    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    meta = {"command": "pipeline bench loader " + " ".join(argv if argv is not None else []),
            "host": platform.node(), "cpu_count": os.cpu_count(), "images": args.images, "repeat": args.repeat,
            "tile": list(TILE), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment(dev, 1)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    where = f"batches delivered on {meta['environment']['hardware']}" if dev.type == "cuda" else "batches on the CPU"
    table = markdown_table(results, f"`{meta['command'].strip()}` on {meta['host']} ({meta['cpu_count']} CPUs, {where}; "
                                    f"on a shared machine absolute numbers are noisy, the ratio is the measurement), "
                                    f"{args.images} real JPEG tiles {TILE[0]}x{TILE[1]}"
                                    f"{f' (each shard listed {args.repeat} times)' if args.repeat > 1 else ''}, "
                                    f"{meta['time']}.")
    (out / "loader.md").write_text("# Loader throughput\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
