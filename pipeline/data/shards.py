"""Write WebDataset tar shards (+ DALI index files + manifest.json) and read them back safely.

Sources: an image folder (class sub-folders optional), labelled arrays in IDX format (Fashion-MNIST), or
image+caption pairs (an image with a sibling ``.txt`` whose first line is the caption). Labelled sources can
also be captioned from their class names with templates (``class_captions``). Every input image is
decoded once before it is written; one that does not decode is reported, skipped and counted in the manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DALI_INDEX_VERSION = "v1.2"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class ShardError(RuntimeError):
    """Shards that cannot be used as they are: missing, truncated, not matching their manifest."""


@dataclass
class Item:
    """One sample before encoding: where it came from, its image (bytes or array), optional label/caption."""

    source: str
    image: bytes | np.ndarray
    ext: str = "png"
    label: int | None = None
    caption: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Sources


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by MNIST / Fashion-MNIST."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ShardError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ShardError(f"{path}: truncated IDX file ({arr.size} values, header says {int(np.prod(shape))})")
    return arr.reshape(shape)


def idx_items(images: str | Path, labels: str | Path | None) -> tuple[list[Item] | Iterator[Item], int]:
    imgs = read_idx(images)
    labs = read_idx(labels) if labels else None
    if labs is not None and len(labs) != len(imgs):
        raise ShardError(f"{images} has {len(imgs)} images but {labels} has {len(labs)} labels")

    def gen() -> Iterator[Item]:
        for i in range(len(imgs)):
            yield Item(f"{Path(images).name}[{i}]", imgs[i], "png", int(labs[i]) if labs is not None else None)

    return gen(), len(imgs)


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def folder_items(root: str | Path) -> tuple[Iterator[Item], int, list[str]]:
    """Images under ``root``; if every image sits in a sub-folder, the sub-folder names are the classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = _image_files(root)
    if not files:
        raise ShardError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    has_classes = all(len(f.relative_to(root).parts) >= 2 for f in files)
    classes = sorted({f.relative_to(root).parts[0] for f in files}) if has_classes else []
    class_idx = {c: i for i, c in enumerate(classes)}

    def gen() -> Iterator[Item]:
        for f in files:
            label = class_idx[f.relative_to(root).parts[0]] if has_classes else None
            yield Item(str(f), f.read_bytes(), _norm_ext(f.suffix), label)

    return gen(), len(files), classes


def caption_items(root: str | Path) -> tuple[Iterator[Item], int]:
    """Images with a sibling ``<stem>.txt``; its first non-empty line is the caption. Images without one are
    skipped (reported by the writer)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"caption folder not found: {root}")
    files = [f for f in _image_files(root) if f.with_suffix(".txt").exists()]
    if not files:
        raise ShardError(f"no image with a sibling .txt caption under {root}")

    def gen() -> Iterator[Item]:
        for f in files:
            lines = [ln.strip() for ln in f.with_suffix(".txt").read_text(errors="replace").splitlines()]
            caption = next((ln for ln in lines if ln), "")
            yield Item(str(f), f.read_bytes(), _norm_ext(f.suffix), None, caption)

    return gen(), len(files)


def class_captions(items: Iterable[Item], classes: list[str], templates: Sequence[str]) -> Iterator[Item]:
    """Caption each labelled item from its class name: item ``i`` gets ``templates[i % len(templates)]`` with the
    lower-cased class name for ``{}`` ("a photo of a sandal."). Turns a labelled data set into image+text
    shards for CLIP, labels kept."""
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ShardError(f"caption templates need a {{}} for the class name, got {list(templates) if not bad else bad}")
    for i, item in enumerate(items):
        if item.label is None or not 0 <= item.label < len(classes):
            raise ShardError(f"{item.source}: no class name for label {item.label} (classes: {classes})")
        yield replace(item, caption=templates[i % len(templates)].format(classes[item.label].lower()))


def _norm_ext(suffix: str) -> str:
    ext = suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _encode(item: Item, image_format: str | None, background: str | None = None
            ) -> tuple[bytes, str, tuple[int, int], str]:
    """Decode-check the image and return (bytes, ext, (w, h), mode). Raises on an unreadable image.

    ``background``: an image with transparency is composited onto this colour and re-encoded (png unless
    ``image_format`` says otherwise). The loaders decode to RGB and drop alpha, so transparent pixels would
    otherwise show whatever colour they happen to store."""
    if isinstance(item.image, np.ndarray):
        img = Image.fromarray(item.image)
        fmt = image_format or "png"
    else:
        img = Image.open(io.BytesIO(item.image))
        img.load()  # decodes every pixel: catches truncated and corrupt files, not just bad headers
        fmt = image_format
    size, mode = img.size, img.mode
    keep = fmt is None or (not isinstance(item.image, np.ndarray) and fmt == item.ext)
    if background is not None and (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, background), img.convert("RGBA")).convert("RGB")
        fmt, keep, mode = fmt or "png", False, img.mode
    if keep:
        return bytes(item.image), item.ext, size, mode  # the original bytes
    buf = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format=fmt.upper())
    return buf.getvalue(), fmt, size, mode


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def tar_bundles(tar: tarfile.TarFile) -> list[list[tuple[str, int, int, str]]]:
    """Samples of an open tar as DALI indexes them: per sample, ``(ext, data offset, size, member name)`` of each
    component, grouped by consecutive basename (as ``wds2idx`` and webdataset's ``group_by_keys`` do)."""
    bundles: list[list[tuple[str, int, int, str]]] = []
    last = None
    for m in tar:
        if not m.isreg():
            continue
        base_start = m.name.rfind("/") + 1
        dot = m.name.find(".", base_start)
        if dot <= base_start:
            continue
        basename, ext = m.name[:dot], m.name[dot + 1 :]
        entry = (ext, m.offset_data, m.size, m.name)
        if basename != last:
            bundles.append([entry])
            last = basename
        else:
            bundles[-1].append(entry)
    return bundles


def format_dali_index(bundles: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI's webdataset index text (format ``v1.2``, as ``wds2idx`` writes it) of :func:`tar_bundles`."""
    lines = [f"{DALI_INDEX_VERSION} {len(bundles)}\n"]
    lines += [" ".join(" ".join(map(str, comp)) for comp in bundle) + "\n" for bundle in bundles]
    return "".join(lines)


def write_dali_index(tar_path: str | Path, idx_path: str | Path) -> int:
    """Write DALI's webdataset index (format ``v1.2``, as ``wds2idx`` writes it) for one tar. Returns samples."""
    with tarfile.open(tar_path) as tar:
        bundles = tar_bundles(tar)
    tmp = Path(str(idx_path) + ".tmp")
    tmp.write_text(format_dali_index(bundles))
    os.replace(tmp, idx_path)
    return len(bundles)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    items: Iterator[Item] | list[Item],
    output: str | Path,
    *,
    shard_size: int = 1000,
    max_shard_bytes: int = 0,
    image_format: str | None = None,
    background: str | None = None,
    total: int | None = None,
    source: str = "",
    classes: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``items`` into ``output/shard-NNNNNN.tar`` (+ ``.idx``) and ``output/manifest.json``.

    Each tar is written under a temporary name and renamed once complete; the manifest is written last, so a
    folder with a manifest is a complete data set. ``background`` (a PIL colour such as ``white``) flattens
    images with transparency onto that colour (see ``_encode``).
    """
    from tqdm import tqdm

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # a rewrite invalidates the old manifest first
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    fields: set[str] = set()
    image_exts: dict[str, int] = {}
    modes: dict[str, int] = {}
    tar: tarfile.TarFile | None = None
    tar_tmp = Path()
    count = nbytes = n_written = 0

    def close_shard() -> None:
        nonlocal tar, count, nbytes
        if tar is None:
            return
        tar.close()
        name = f"shard-{len(shards):06d}"
        final = out / f"{name}.tar"
        os.replace(tar_tmp, final)
        write_dali_index(final, out / f"{name}.idx")
        shards.append({
            "file": final.name, "index": f"{name}.idx", "num_samples": count,
            "bytes": final.stat().st_size, "sha256": sha256_file(final),
        })
        tar, count, nbytes = None, 0, 0

    bar = tqdm(items, total=total, desc=f"writing {out}", unit="img", disable=not progress, mininterval=1.0)
    for item in bar:
        try:
            data, ext, _, mode = _encode(item, image_format, background)
        except Exception as exc:  # noqa: BLE001 PIL raises many types for bad files
            skipped.append({"item": item.source, "error": f"{type(exc).__name__}: {exc}"})
            bar.write(f"skipping unreadable image {item.source}: {type(exc).__name__}: {exc}")
            continue
        if item.caption is not None and not item.caption:
            skipped.append({"item": item.source, "error": "empty caption"})
            continue
        if tar is None:
            tar_tmp = out / f"shard-{len(shards):06d}.tar.partial"
            tar = tarfile.open(tar_tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans many samples)
        key = f"{n_written:09d}"
        members = {ext: data}
        if item.label is not None:
            members["cls"] = str(item.label).encode()
        if item.caption is not None:
            members["txt"] = item.caption.encode()
        for field_ext, payload in members.items():
            _add_member(tar, f"{key}.{field_ext}", payload)
            nbytes += len(payload) + 512
        fields.update(members)
        image_exts[ext] = image_exts.get(ext, 0) + 1
        modes[mode] = modes.get(mode, 0) + 1
        count += 1
        n_written += 1
        if count >= shard_size or (max_shard_bytes and nbytes >= max_shard_bytes):
            close_shard()
    close_shard()
    if not shards:
        raise ShardError(f"no readable samples were written to {out} ({len(skipped)} skipped)")
    manifest = {
        "format": "webdataset",
        "version": 1,
        "source": source,
        "num_samples": n_written,
        "image_key": max(image_exts, key=image_exts.get),
        "image_keys": sorted(image_exts),
        "image_modes": modes,
        "fields": sorted(fields),
        "classes": classes or [],
        "num_skipped": len(skipped),
        "skipped": skipped[:1000],
        "shards": shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class ShardSet:
    """A validated shard folder: absolute tar paths with their sample counts, and the manifest."""

    root: Path
    manifest: dict[str, Any]
    paths: list[Path] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def image_key(self) -> str:
        return self.manifest.get("image_key", "jpg")

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))


def open_shards(path: str | Path, verify: str = "size", require: tuple[str, ...] = ()) -> ShardSet:
    """Load ``path/manifest.json`` and check the shards it lists exist (and match by size or sha256)."""
    root = Path(path)
    if not str(path):
        raise ShardError("no shard folder given (set data.train_shards to a folder written by `pipeline shards write`)")
    if not root.exists():
        raise ShardError(f"shard folder not found: {root}")
    mpath = root / MANIFEST if root.is_dir() else root
    if not mpath.is_file():
        raise ShardError(f"{root} has no {MANIFEST}; write shards with `pipeline shards write ... --output {root}`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{mpath} is not valid JSON: {exc}") from exc
    root = mpath.parent
    entries = manifest.get("shards", [])
    if not entries:
        raise ShardError(f"{mpath} lists no shards")
    missing = [k for k in require if k not in manifest.get("fields", [])]
    if missing:
        raise ShardError(f"shards in {root} have fields {manifest.get('fields')}, but {missing} are needed")
    paths, counts = [], []
    for e in entries:
        p = root / e["file"]
        if not p.is_file():
            raise ShardError(f"shard {p} listed in {mpath} is missing")
        if verify in ("size", "sha256") and p.stat().st_size != e["bytes"]:
            raise ShardError(
                f"shard {p} is {p.stat().st_size} bytes but the manifest says {e['bytes']}: truncated or rewritten; "
                f"re-run `pipeline shards write`"
            )
        if verify == "sha256" and "sha256" not in e:
            raise ShardError(f"{mpath} has no sha256 for {e['file']} (a manifest from `pipeline shards index`, which "
                             f"does not hash the data); use data.verify=size")
        if verify == "sha256" and sha256_file(p) != e["sha256"]:
            raise ShardError(f"shard {p} does not match the sha256 in {mpath}")
        paths.append(p)
        counts.append(int(e["num_samples"]))
    return ShardSet(root=root, manifest=manifest, paths=paths, counts=counts)
