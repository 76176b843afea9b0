"""Real JPEG shards for throughput benchmarks, offline: Debian's wallpaper photos cut into tiles.

    apt-get download lomiri-wallpapers-16.04 && dpkg -x lomiri-wallpapers-16.04_*.deb /tmp/lomiri
    python benchmarks/make_jpeg_shards.py /tmp/lomiri/usr/share/backgrounds data/jpeg-tiles --tile 256

writes TILE x TILE JPEG tiles (quality 90) under OUTPUT/images, then WebDataset shards under OUTPUT/shards
with ``pipeline shards write --format folder`` (the source bytes are kept: the loaders decode real JPEGs).
Nothing is committed: the photos keep their own licences.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def cut_tiles(src: Path, out: Path, tile: int, max_tiles: int, quality: int = 90) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                if max_tiles and n >= max_tiles:
                    return n
                img.crop((x, y, x + tile, y + tile)).save(out / f"{path.stem}_{y}_{x}.jpg", quality=quality)
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="folder of photos (e.g. /tmp/lomiri/usr/share/backgrounds)")
    ap.add_argument("output", type=Path)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--max-tiles", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args()
    n = cut_tiles(args.source, args.output / "images", args.tile, args.max_tiles)
    print(f"{n} tiles of {args.tile} px in {args.output / 'images'}")
    from pipeline.cli import main as cli

    cli(["shards", "write", "--format", "folder", "--input", str(args.output / "images"), "--output",
         str(args.output / "shards"), "--shard-size", str(args.shard_size), "--no-progress"])


if __name__ == "__main__":
    main()
