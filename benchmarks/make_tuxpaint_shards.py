"""Real image+caption shards for CLIP from the Debian archive: the stamps of Tux Paint (tuxpaint-stamps-default).

    python benchmarks/make_tuxpaint_shards.py data/tuxpaint/shards --cache data/tuxpaint/cache

fetches the package with ``apt-get download`` into ``--cache`` (once; the stamps are GPL, so they are fetched at
run time and never committed), extracts it with ``dpkg -x``, and writes shards with
``pipeline shards write --format captions --background white``: each stamp PNG with the first line of its
sibling .txt (English; the other lines are translations, ``xx.utf8=...``), transparent stamps composited on
white. About 785 pairs (the ``*_mirror.png`` variants have no caption and are not pairs; SVG stamps are left
out). Needs apt's package lists (``apt-get update``) and network access to a Debian mirror.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

PACKAGE = "tuxpaint-stamps-default"
STAMPS = Path("usr/share/tuxpaint/stamps")


def fetch_stamps(cache: Path) -> Path:
    """The stamps folder of the extracted package in ``cache``, downloaded and extracted on first use.
    Raises ``subprocess.CalledProcessError`` when apt-get cannot download it."""
    root = cache / "root"
    if not (root / STAMPS).is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        if not list(cache.glob(f"{PACKAGE}_*.deb")):
            subprocess.run(["apt-get", "download", PACKAGE], cwd=cache, check=True, capture_output=True, text=True)
        partial = cache / "root.partial"  # renamed once complete: an interrupted extraction is redone
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(["dpkg", "-x", str(max(cache.glob(f"{PACKAGE}_*.deb"))), str(partial)], check=True)
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    return root / STAMPS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="shard folder to write")
    ap.add_argument("--cache", type=Path, default=Path("data/tuxpaint/cache"),
                    help="where the .deb and its extraction are kept (default: data/tuxpaint/cache)")
    ap.add_argument("--shard-size", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        stamps = fetch_stamps(args.cache)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"could not fetch {PACKAGE}: {' '.join(exc.cmd)} failed: {(exc.stderr or '').strip()}\n"
                         f"(needs apt's package lists, `apt-get update`, and a reachable Debian mirror)") from exc
    from pipeline.cli import main as cli

    return cli(["shards", "write", "--format", "captions", "--input", str(stamps), "--output", str(args.output),
                "--background", "white", "--shard-size", str(args.shard_size), "--no-progress"])


if __name__ == "__main__":
    raise SystemExit(main())
