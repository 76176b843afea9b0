"""``pipeline bench loader``: images/sec of the loader backends over the same real JPEG photos, same recipe, same
CPU cores, measured in one run: from local disk, and (``--sources``) from an S3-compatible server and a plain HTTP
server on 127.0.0.1, with remote/local ratios; against a plain webdataset + DataLoader pipeline written the way
open_clip's ``get_wds_dataset`` is (``--openclip``); and (``--e2e-steps``) the data-wait fraction of a short
training run streaming from S3 next to the same run from local disk.

Photos: the wallpapers of a Debian package (``apt-get download lomiri-wallpapers-16.04``, ``dpkg -x``), cut at
run time into 500x375 JPEG tiles (at a few scales, so tiles differ) and written as WebDataset shards. Nothing of
them is committed. The S3 server is moto's standalone server (``moto[server]``), the HTTP server Python's
``http.server``, both started here on loopback ports. ``--device cuda`` delivers every batch on the GPU: DALI
decodes there (``mixed``: nvJPEG) and augments there; the torch backend decodes and augments in DataLoader workers
on the CPU cores and copies pinned batches over. ``--repeat K`` lists every shard K times (links, no copies) so an
epoch of the benchmark set lasts as long as a corpus-sized one (see ``repeat_shards``). Every configuration is
measured ``--repeats`` times, the configurations alternating, and reported as the median with the spread; the
machine's load average is recorded with each run. Results: ``benchmarks/results/loader.json`` and ``loader.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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



# ---------------------------------------------------------------------------------------------------------------
# Loopback servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def loopback_sources(shards: Path, sources: list[str], log_dir: Path) -> Iterator[dict[str, str]]:
    """The URLs of ``shards`` for each of ``sources``: ``local`` (the folder), ``s3`` (moto's server on 127.0.0.1,
    the shards uploaded to ``s3://bench/shards``; AWS_ENDPOINT_URL and dummy credentials set in this process's
    environment, which child processes inherit) and ``http`` (``http.server`` on 127.0.0.1)."""
    urls = {"local": str(shards)}
    procs: list[subprocess.Popen] = []
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        if "s3" in sources:
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=open(log_dir / "moto.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
            procs.append(proc)
            _wait_for_port(port, proc, "moto's S3 server")
            os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_REGION": "us-east-1"})
            import boto3

            client = boto3.session.Session().client("s3")
            client.create_bucket(Bucket="bench")
            for f in sorted(shards.iterdir()):
                client.upload_file(str(f), "bench", f"shards/{f.name}")
            urls["s3"] = "s3://bench/shards"
        if "http" in sources:
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                     str(shards), str(port)], stdout=open(log_dir / "http.log", "w"),  # noqa: SIM115
                                    stderr=subprocess.STDOUT)
            procs.append(proc)
            _wait_for_port(port, proc, "the HTTP server")
            urls["http"] = f"http://127.0.0.1:{port}"
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------------
# Loaders under test


def _measure(loader, warmup: int, batches: int, device=None) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    if device is not None:
        _sync(device)  # batches still being copied or augmented on the GPU belong to the warm-up
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        batch = next(it)
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else batch.size  # open_clip-style: [view, view]
    if device is not None:
        _sync(device)
    return n / (time.perf_counter() - start)


def openclip_style_loader(urls: list[str], recipe, batch_size: int, workers: int, seed: int, epoch_batches: int):
    """A plain webdataset + DataLoader pipeline as open_clip's ``get_wds_dataset`` builds it for training (without
    resampling): shard list, epoch-seeded shard shuffle, split by node and worker, tar to samples, sample shuffle
    buffer (5000, initial 1000), keep samples with an image, ``decode("pilrgb")``, the recipe's views with
    torchvision, ``batched``, ``WebLoader`` with persistent workers and ``with_epoch``. Yields (views, ...)."""
    import torch
    import webdataset as wds

    from pipeline.data.recipes import render_torchvision

    views = [render_torchvision(v) for v in recipe.views]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=2000, initial=500, seed=seed),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),
        wds.select(lambda s: "jpg" in s),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple(*["jpg"] * len(views)),
        wds.map_tuple(*views),
        wds.batched(batch_size, partial=False, collation_fn=torch.utils.data.default_collate),
    ).with_epoch(max(1, epoch_batches // max(1, workers)))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                         persistent_workers=workers > 0)


class _Tuples:
    """Wraps a loader of (view, view, ...) tuples to count images like ours."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        while True:
            yield from self.loader


def _our_loader(source: str, backend: str, reader: str, *, image_size: int, batch_size: int, cpu_cores: int,
                recipe: str, cache_dir: Path, device):
    from pipeline.config import config_from_dict
    from pipeline.data.loader import build_loader
    from pipeline.data.recipes import build_recipe
    from pipeline.distributed import DistEnv

    cfg = config_from_dict({
        "data": {"train_shards": source, "cache_dir": str(cache_dir)},
        "loader": {"backend": backend, "batch_size": batch_size, "num_workers": cpu_cores, "dali_reader": reader},
        "augment": {"recipe": recipe, "image_size": image_size},
    })
    return build_loader(cfg, DistEnv(), device, build_recipe(cfg.augment))


def bench_loader(urls: dict[str, str], *, backends: tuple[str, ...] = ("dali", "torch"),
                 dali_readers: tuple[str, ...] = ("auto",), openclip: bool = False, image_size: int = 224,
                 batch_size: int = 64, cpu_cores: int = 2, recipe: str = "simclr", warmup: int = 3,
                 batches: int = 24, repeats: int = 2, cache_dir: Path | None = None, device: str = "cpu"
                 ) -> list[dict[str, Any]]:
    """Images/sec of each (source, backend[, DALI reader]) and of the open_clip-style pipeline: ``cpu_cores``
    DataLoader workers / DALI threads, the process pinned to that many cores, batches delivered on ``device``
    (``cuda``: DALI decodes and augments on the GPU), configurations alternated ``repeats`` times; the median is
    reported with every run and the load average around it."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data.recipes import build_recipe

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpu_cores])
    torch.set_num_threads(1)  # the main process only collates; the work is in workers / DALI threads
    cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="bench-loader-cache-"))
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    rcp = build_recipe(config_from_dict({"augment": {"recipe": recipe, "image_size": image_size}}).augment)
    cases: list[tuple[str, str, str]] = []  # (source, backend, reader)
    for name in urls:
        for backend in backends:
            for reader in (dali_readers if backend == "dali" else ("-",)):
                if not (reader == "native" and name == "http"):  # DALI's reader opens files and s3:// only
                    cases.append((name, backend, reader))
        if openclip and name in ("local", "http"):  # webdataset opens files and http(s) itself (curl)
            cases.append((name, "openclip", "-"))
    runs: dict[tuple[str, str, str], list[tuple[float, float]]] = {c: [] for c in cases}
    for _ in range(repeats):
        for case in cases:
            name, backend, reader = case
            if backend == "openclip":
                src = _resolved(urls[name], cache_dir)
                loader = _Tuples(openclip_style_loader(src.paths, rcp, batch_size, cpu_cores, 0,
                                                       src.num_samples // batch_size))
            else:
                loader = _our_loader(urls[name], backend, reader if reader != "-" else "auto", image_size=image_size,
                                     batch_size=batch_size, cpu_cores=cpu_cores, recipe=recipe, cache_dir=cache_dir,
                                     device=dev)
            load = os.getloadavg()[0]
            rate = _measure(loader, warmup, batches, dev if backend != "openclip" else None)
            runs[case].append((rate, round(load, 1)))
            del loader
    out = []
    for (name, backend, reader), rs in runs.items():
        rates = [r for r, _ in rs]
        out.append({
            "source": name, "backend": backend, "dali_reader": reader, "image_size": image_size,
            "cpu_cores": cpu_cores, "images_per_sec": round(statistics.median(rates), 1),
            "runs_images_per_sec": [round(r, 1) for r in rates], "load_average_1m": [ld for _, ld in rs],
            "recipe": recipe, "views": len(rcp.views), "batch_size": batch_size, "device": dev.type,
            "decode": (("mixed (GPU)" if dev.type == "cuda" else "cpu") if backend == "dali"
                       else "PIL (CPU workers)"),
        })
    local = {(r["backend"], r["dali_reader"]): r for r in out if r["source"] == "local"}
    for r in out:
        base = local.get((r["backend"], r["dali_reader"])) or local.get((r["backend"], "auto"))
        if r["source"] != "local" and base:
            r["vs_local"] = round(_ratio_median(r, base), 3)  # the same reader on local disk
        native = local.get(("dali", "native"))
        if r["source"] != "local" and r["backend"] == "dali" and native:
            r["vs_local_native"] = round(_ratio_median(r, native), 3)  # what auto picks for local shards
        if r["backend"] == "torch":
            oc = next((o for o in out if o["source"] == r["source"] and o["backend"] == "openclip"), None)
            if oc:
                r["vs_openclip"] = round(_ratio_median(r, oc), 3)
    return out


def _ratio_median(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median of the per-repeat ratios (runs of one repeat ran next to each other, under the same load)."""
    return statistics.median(x / y for x, y in zip(a["runs_images_per_sec"], b["runs_images_per_sec"]))


def _resolved(source: str, cache_dir: Path):
    from pipeline.data.sources import resolve_source

    return resolve_source(source, cache_dir=str(cache_dir), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# End to end: data wait while training from S3


def bench_e2e_remote(urls: dict[str, str], config: str, overrides: list[str], backends: list[str], warmup: int,
                     steps: int) -> list[dict[str, Any]]:
    """``bench e2e`` (the real trainer, timed through its log steps) on each source: data-wait fraction and
    images/sec per backend, with the synthetic loader as the no-data-cost reference."""
    from pipeline.bench.common import run_ranks
    from pipeline.bench.e2e import bench_e2e_rank
    from pipeline.bench.flops import count_step_flops
    from pipeline.config import load_config

    rows = []
    for name, url in urls.items():
        cfg = load_config(config, [*overrides, f"data.train_shards={url}", "launcher.nprocs=1"])
        tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
        try:
            res = run_ranks(bench_e2e_rank, cfg, [*backends, "synthetic"], warmup, steps, str(tmp),
                            count_step_flops(cfg), 0.0, False, False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for r in res:
            if "error" in r:
                continue
            rows.append({"source": name if r["backend"] != "synthetic" else "-", "backend": r["backend"],
                         "images_per_sec": round(r["images_per_sec"], 1),
                         "data_wait_fraction": round(r["data_wait_fraction"], 4),
                         "step_time_s": round(r["step_time_s"], 3), "load_average_1m": round(os.getloadavg()[0], 1)})
    seen, out = set(), []
    for r in rows:  # one synthetic row is enough
        key = (r["source"], r["backend"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report


def markdown_table(results: list[dict[str, Any]], note: str = "") -> str:
    base = {r["image_size"]: r["images_per_sec"] for r in results if r["backend"] == "torch" and
            r.get("source", "local") == "local"}
    header = ("| source | backend | DALI reader | decode | image_size | cpu_cores | recipe (views) | batch "
              "| images/sec (median) | runs | vs torch (local) | remote / local (same reader) "
              "| remote / local DALI native | torch / open_clip-style |")
    lines = [header, "|" + " --- |" * 14]
    for r in results:
        ratio = f"{r['images_per_sec'] / base[r['image_size']]:.2f}x" if r["image_size"] in base else "-"
        runs = ", ".join(f"{x:.0f}" for x in r.get("runs_images_per_sec", []))
        vs_local = f"{r['vs_local']:.2f}" if "vs_local" in r else "-"
        vs_oc = f"{r['vs_openclip']:.2f}" if "vs_openclip" in r else "-"
        vs_native = f"{r['vs_local_native']:.2f}" if "vs_local_native" in r else "-"
        lines.append(f"| {r.get('source', 'local')} | {r['backend']} | {r.get('dali_reader', '-')} | "
                     f"{r.get('decode', '-')} | {r['image_size']} | {r['cpu_cores']} | {r['recipe']} ({r['views']}) | "
                     f"{r['batch_size']} | {r['images_per_sec']:.1f} | {runs} | {ratio} | {vs_local} | {vs_native} | "
                     f"{vs_oc} |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def e2e_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | backend | images/sec | data-wait fraction | step time (s) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['backend']} | {r['images_per_sec']:.1f} | "
                     f"{r['data_wait_fraction']:.1%} | {r['step_time_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024, help="JPEG tiles to cut and shard")
    p.add_argument("--image-size", type=int, nargs="+", default=[224])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu-cores", type=int, default=2)
    p.add_argument("--recipe", default="simclr")
    p.add_argument("--batches", type=int, default=24, help="measured batches per run (after 3 warm-up batches)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["dali", "torch"])
    p.add_argument("--sources", nargs="+", default=["local"], choices=["local", "s3", "http"],
                   help="where the same shards are read from: local disk, moto's S3 server and an HTTP server on "
                        "127.0.0.1 (both started here)")
    p.add_argument("--dali-readers", nargs="+", default=["auto"], choices=["auto", "native", "stream"],
                   help="loader.dali_reader values to measure for the dali backend")
    p.add_argument("--openclip", action="store_true",
                   help="also measure a webdataset + DataLoader pipeline written as open_clip's get_wds_dataset")
    p.add_argument("--e2e-steps", type=int, default=0,
                   help="also run `bench e2e` on each source for this many timed steps (data-wait fraction)")
    p.add_argument("--e2e-config", default="configs/quickstart.yaml")
    p.add_argument("--e2e-set", nargs="*", default=["augment.image_size=96", "model.img_size=96",
                                                    "model.patch_size=16", "loader.batch_size=32",
                                                    "loader.num_workers=2", "metrics.log_every=5"],
                   help="overrides of the e2e config")
    p.add_argument("--photos", help="folder of JPEG photos to cut (default: download the Debian wallpapers)")
    p.add_argument("--workdir", help="where photos, tiles and shards go (default: a temporary folder); shards "
                   "already there (WORKDIR/shards-IMAGES/manifest.json) are used as they are")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where batches are delivered; cuda: "
                   "DALI decodes (mixed) and augments on the GPU, torch copies its batches there")
    p.add_argument("--repeat", type=int, default=1, help="list every shard this many times (links), so an epoch "
                   "outlasts the measurement as on a real corpus")
    p.add_argument("--output", default="benchmarks/results", help="folder for loader.json and loader.md")
    p.add_argument("--name", default="loader", help="results file stem (loader.json / loader.md)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        workdir = Path(args.workdir or tmp)
        shards = prepare_shards(workdir, args.images, args.photos)
        if args.repeat > 1:
            shards = repeat_shards(shards, workdir / f"shards-{args.images}-x{args.repeat}", args.repeat)
        results, e2e = [], []
        with loopback_sources(shards, args.sources, workdir / "servers") as urls:
            for size in args.image_size:
                results += bench_loader(urls, backends=tuple(args.backends), dali_readers=tuple(args.dali_readers),
                                        openclip=args.openclip, image_size=size, batch_size=args.batch_size,
                                        cpu_cores=args.cpu_cores, recipe=args.recipe, batches=args.batches,
                                        repeats=args.repeats, cache_dir=workdir / "cache", device=args.device)
            if args.e2e_steps:
                e2e = bench_e2e_remote(urls, args.e2e_config,
                                       [*args.e2e_set, f"data.cache_dir={workdir / 'cache'}"],
                                       [b for b in args.backends if b != "openclip"], 5, args.e2e_steps)
    import torch

    from pipeline.bench.common import environment

    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    meta = {"command": "pipeline bench loader " + " ".join(argv if argv is not None else sys.argv[2:]),
            "host": platform.node(), "cpu_count": os.cpu_count(), "images": args.images, "repeat": args.repeat,
            "tile": list(TILE), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment(dev, 1),
            "load_average_end": [round(x, 1) for x in os.getloadavg()]}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results, "e2e": e2e}, indent=1) + "\n")
    where = f"batches delivered on {meta['environment']['hardware']}" if dev.type == "cuda" else "batches on the CPU"
    table = markdown_table(results, f"`{meta['command'].strip()}` on {meta['host']} ({meta['cpu_count']} CPUs, "
                                    f"{where}; shared: 1-minute load average at each run in loader.json, "
                                    f"{meta['load_average_end']} at the end; absolute numbers are noisy, the "
                                    f"ratios of runs made next to each other are the measurement), {args.images} "
                                    f"real JPEG tiles {TILE[0]}x{TILE[1]}"
                                    f"{f' (each shard listed {args.repeat} times)' if args.repeat > 1 else ''}, "
                                    f"{meta['time']}.")
    text = "# Loader throughput\n\n" + table
    if e2e:
        text += "\n## End to end: data wait while training\n\n" + e2e_table(e2e)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
