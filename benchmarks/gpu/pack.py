"""Carry the GPU run's payload to the device machine in parts, and check and join it there.

The device tool sends at most 64 MiB per call (working tree + carried paths), and ignored files it left in the
repository there survive only while the machine is warm. So the payload (DALI's wheels and the JPEG shards,
~300 MB) is cut here into parts of at most 60 MiB, one part per call folder ``.gpu/callK/``, each carried by one
call, one call right after another; the last call also carries ``core/`` (the small wheels and the
Fashion-MNIST subset the GPU tests read) and runs ``benchmarks/gpu/run.sh``.

    pack   (here)  STAGE -> .gpu/call1/part-00 ... .gpu/callN/{part-*, core/}, manifest.json in every call folder
    check  (there) which parts are present and intact (each call's own command: benchmarks/gpu/have.sh)
    join   (there) verify every part, stream them back together into the payload folder
    stamp  (here)  record the commit and the sha256 of every tracked file in the last call folder
    tree   (there) compare the tree there with the stamp: prints ``<commit>`` or ``<commit>+local-changes``
    wheels (here)  the wheels benchmarks/gpu/wheels.txt names, picked from a download folder into big/ and core/
    idx-head (here) the first N records of an IDX file (the Fashion-MNIST subset the GPU tests read)

Standard library only: it runs before anything is installed there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

MIB = 1 << 20
MANIFEST = "manifest.json"
STAMP = "tree.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def travelling_bytes(repo: Path) -> int:
    """Bytes of what every device call sends besides ``carry``: tracked files and untracked files git does not
    ignore (the device tool's rule). 0 outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for name in out.decode().split("\0"):
        p = repo / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def _tar_bytes(src: Path) -> Iterator[bytes]:
    """A deterministic uncompressed tar of ``src`` (sorted, mtime 0), streamed. Wheels and JPEGs are already
    compressed; compressing again would cost time on both machines for a few percent."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (streamed in chunks)
    for path in _files(src):
        info = tarfile.TarInfo(path.relative_to(src).as_posix())
        info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
        with open(path, "rb") as f:
            tar.addfile(info, f)
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    tar.close()
    yield buf.getvalue()


MARGIN_MIB = 2.0
"""Room left in every call for the working tree to grow between packing and the run."""


def call_room(tree_bytes: int, limit_mib: float) -> int:
    """Bytes one call may carry besides the working tree."""
    return int((limit_mib - MARGIN_MIB) * MIB) - tree_bytes


def part_size(core_bytes: int, tree_bytes: int, part_mib: float, limit_mib: float) -> int:
    """Parts of at most ``part_mib``, each call's carried bytes plus the working tree under ``limit_mib``."""
    room = call_room(tree_bytes, limit_mib)
    part = min(int(part_mib * MIB), room)
    if core_bytes > room or part <= 0:
        raise SystemExit(f"pack: the working tree ({tree_bytes / MIB:.1f} MiB) plus the core folder "
                         f"({core_bytes / MIB:.1f} MiB) leave no room under the {limit_mib:g} MiB a device call carries")
    return part


def pack(stage: Path, out: Path, repo: Path, part_mib: float = 60, limit_mib: float = 64) -> dict:
    """Cut ``stage/big`` into parts and lay out ``out/call*/``; returns the manifest (also written there)."""
    big, core = stage / "big", stage / "core"
    for old in out.glob("call*"):
        shutil.rmtree(old)
    tree = travelling_bytes(repo)
    big_files = _files(big) if big.exists() else []
    core_files = _files(core) if core.exists() else []
    core_bytes = sum(p.stat().st_size for p in core_files)
    size = part_size(core_bytes, tree, part_mib, limit_mib)

    parts: list[dict] = []
    payload = hashlib.sha256()
    total = 0
    current = None
    h = None

    def close() -> None:
        nonlocal current, h
        if current is not None:
            current.close()
            parts[-1]["sha256"] = h.hexdigest()
            current = h = None

    if big_files:
        for chunk in _tar_bytes(big):
            payload.update(chunk)
            total += len(chunk)
            view = memoryview(chunk)
            while view:
                if current is None:
                    k = len(parts) + 1
                    name = f"call{k}/part-{k - 1:02d}"
                    (out / f"call{k}").mkdir(parents=True, exist_ok=True)
                    current, h = open(out / name, "wb"), hashlib.sha256()  # noqa: SIM115 (closed in close())
                    parts.append({"file": name, "bytes": 0})
                take = view[: size - parts[-1]["bytes"]]
                current.write(take)
                h.update(take)
                parts[-1]["bytes"] += len(take)
                view = view[len(take):]
                if parts[-1]["bytes"] >= size:
                    close()
        close()
    last = len(parts)
    if last == 0 or parts[-1]["bytes"] + core_bytes > call_room(tree, limit_mib):
        last += 1  # the core folder goes alone in one more call
    final = out / f"call{last}"
    final.mkdir(parents=True, exist_ok=True)
    if core.exists():
        shutil.copytree(core, final / "core")
    calls = []
    for k in range(1, last + 1):
        carried = sum(p["bytes"] for p in parts if p["file"].startswith(f"call{k}/"))
        carried += core_bytes if k == last else 0
        calls.append({"call": k, "carry": [f".gpu/call{k}"], "carried_bytes": carried,
                      "command": "bash benchmarks/gpu/run.sh" if k == last else "bash benchmarks/gpu/have.sh",
                      "timeout_s": 570 if k == last else 60})
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "payload": {"bytes": total, "sha256": payload.hexdigest(), "files": len(big_files)},
        "parts": parts,
        "core": {p.relative_to(core).as_posix(): sha256_file(p) for p in core_files},
        "core_bytes": core_bytes,
        "tree_bytes": tree,
        "limit_mib": limit_mib,
        "part_mib": size / MIB,
        "calls": calls,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    for k in range(1, last + 1):
        (out / f"call{k}" / MANIFEST).write_text(text)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# There


def find_manifest(gpu: Path) -> dict | None:
    """The newest manifest among the call folders present (they are identical copies from one pack)."""
    found = [json.loads(p.read_text()) for p in sorted(gpu.glob(f"call*/{MANIFEST}"))]
    return max(found, key=lambda m: m["created"]) if found else None


def check_parts(gpu: Path, manifest: dict, full: bool = True) -> tuple[list[str], list[str]]:
    """(parts present and intact, parts missing or damaged) with a reason each."""
    ok, bad = [], []
    for part in manifest["parts"]:
        p = gpu / part["file"]
        if not p.exists():
            bad.append(f"{part['file']} (missing)")
        elif p.stat().st_size != part["bytes"]:
            bad.append(f"{part['file']} ({p.stat().st_size} bytes, expected {part['bytes']})")
        elif full and sha256_file(p) != part["sha256"]:
            bad.append(f"{part['file']} (sha256 differs)")
        else:
            ok.append(part["file"])
    return ok, bad


def check_core(gpu: Path, manifest: dict) -> list[str]:
    last = manifest["calls"][-1]["carry"][0].split("/", 1)[1]
    core = gpu / last / "core"
    return [f"core/{rel}" for rel, digest in manifest["core"].items()
            if not (core / rel).exists() or sha256_file(core / rel) != digest]


def join(gpu: Path, dest: Path) -> Path:
    """Verify every part and extract the payload they make into ``dest`` (replaced). Raises SystemExit(3) with
    the missing parts named when the set is incomplete."""
    manifest = find_manifest(gpu)
    if manifest is None:
        raise SystemExit(f"join: no {MANIFEST} under {gpu}/call*/: carry the call folders (see benchmarks/gpu/README.md)")
    done = dest / ".payload-sha256"
    if done.exists() and done.read_text().strip() == manifest["payload"]["sha256"]:
        return dest  # joined by an earlier call on this (still warm) machine
    _, bad = check_parts(gpu, manifest)
    if bad:
        print(f"join: {len(bad)} of {len(manifest['parts'])} parts missing or damaged: {', '.join(bad)}. The "
              f"machine went cold between calls (it keeps ignored files only while warm): carry them again, one call "
              f"right after another.", file=sys.stderr)
        raise SystemExit(3)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h = hashlib.sha256()

    class Joined(io.RawIOBase):
        def __init__(self) -> None:
            self.files = iter(manifest["parts"])
            self.f = None

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            while True:
                if self.f is None:
                    part = next(self.files, None)
                    if part is None:
                        return 0
                    self.f = open(gpu / part["file"], "rb")  # noqa: SIM115 (closed at its end)
                n = self.f.readinto(b)
                if n:
                    h.update(memoryview(b)[:n])
                    return n
                self.f.close()
                self.f = None

    with tarfile.open(fileobj=io.BufferedReader(Joined(), MIB), mode="r|") as tar:
        tar.extractall(tmp, filter="data")
    if h.hexdigest() != manifest["payload"]["sha256"]:
        raise SystemExit("join: the joined payload's sha256 differs from the manifest's; pack again here")
    (tmp / done.name).write_text(manifest["payload"]["sha256"] + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Which code ran


def stamp(repo: Path, final_call: Path) -> dict:
    """Write the commit, whether the checkout differs from it, and every tracked file's sha256 into
    ``final_call/tree.json``: .git does not travel, so this is how the results there name their commit."""
    git = ["git", "-C", str(repo)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, check=True).stdout.strip())
    names = subprocess.run([*git, "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    files = {n: sha256_file(repo / n) for n in names if n and (repo / n).is_file() and not (repo / n).is_symlink()}
    info = {"commit": commit, "dirty_here": dirty, "files": files}
    final_call.mkdir(parents=True, exist_ok=True)
    (final_call / STAMP).write_text(json.dumps(info) + "\n")
    return info


def tree_line(repo: Path, gpu: Path) -> str:
    """``<commit>`` when every stamped file there matches, else ``<commit>+local-changes`` (files named on
    stderr); ``unknown`` without a stamp. A checkout with .git answers from git itself."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+local-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    stamps = sorted(gpu.glob(f"call*/{STAMP}"))
    if not stamps:
        return "unknown"
    info = json.loads(stamps[-1].read_text())
    changed = [n for n, d in info["files"].items() if not (repo / n).is_file() or sha256_file(repo / n) != d]
    if changed:
        print(f"tree: {len(changed)} file(s) differ from {info['commit'][:12]}: {', '.join(changed[:20])}",
              file=sys.stderr)
    return info["commit"] + ("+local-changes" if changed or info["dirty_here"] else "")


# ---------------------------------------------------------------------------------------------------------------
# Here: what goes into the payload


def read_wheel_list(path: Path) -> list[tuple[str, str, str, str]]:
    """(group, name, version, how) of every line of wheels.txt."""
    out = []
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        group, req, how = fields[0], fields[1], fields[2]
        if group not in ("big", "core") or how not in ("wheel", "sdist") or "==" not in req:
            raise SystemExit(f"{path}: cannot read {line.strip()!r} (group big|core, name==version, wheel|sdist)")
        name, version = req.split("==")
        out.append((group, name, version, how))
    return out


def wheel_prefix(name: str, version: str) -> str:
    """The start of a wheel's file name for ``name==version`` (PEP 427: runs of -_. become _)."""
    import re

    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def select_wheels(listing: Path, cache: Path, stage: Path) -> list[str]:
    """Link (or copy) each listed wheel from ``cache`` into ``stage/<group>/wheels``; returns what is missing."""
    missing = []
    for group, name, version, _ in read_wheel_list(listing):
        prefix = wheel_prefix(name, version)
        found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(prefix))
        if not found:
            missing.append(f"{name}=={version}")
            continue
        dest = stage / group / "wheels"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            os.link(found[-1], dest / found[-1].name)
        except OSError:
            shutil.copy2(found[-1], dest / found[-1].name)
    return missing


# What the device image holds already (/work/.library/device/KINDS.md, "Python packages already there"), as far
# as the carried wheels ask for it: a requirement named here is not carried.
IMAGE_HAS = {
    "cloudpickle", "einops", "filelock", "fsspec", "jinja2", "msgpack", "ninja", "numpy", "nvidia-ml-py",
    "packaging", "pillow", "psutil", "py-cpuinfo", "pyyaml", "requests", "safetensors", "setuptools", "six",
    "sympy", "torch", "torchvision", "tqdm", "triton", "wheel", "timm", "networkx",
}


def _canon(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def uncovered_requirements(wheels: list[Path], python: str = "3.12") -> list[str]:
    """Requirements (Requires-Dist) of ``wheels`` that neither another of them nor the image satisfies by name,
    markers evaluated for CPython ``python`` on Linux and extras followed as the wheels ask for them."""
    import zipfile

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    meta: dict[str, list[Requirement]] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Name:"))
        meta[_canon(name)] = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
                              if line.startswith("Requires-Dist:")]
    env = dict(default_environment(), python_version=python, python_full_version=f"{python}.0",
               platform_system="Linux", sys_platform="linux", implementation_name="cpython")
    extras: dict[str, set[str]] = {n: {""} for n in meta}
    todo = list(meta)
    missing: list[str] = []
    while todo:
        name = todo.pop()
        for req in meta.get(name, []):
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras[name]):
                continue
            dep = _canon(req.name)
            if dep in meta:
                if not set(req.extras) <= extras[dep]:
                    extras[dep] |= set(req.extras)
                    todo.append(dep)
            elif dep not in IMAGE_HAS:
                missing.append(f"{req} (for {name})")
    return sorted(set(missing))


def idx_head(src: Path, dst: Path, n: int) -> None:
    """Write the first ``n`` records of the (gzipped) IDX file ``src`` to ``dst``, gzipped, header adjusted."""
    import gzip
    import struct

    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as f:
        magic = f.read(4)
        ndim = magic[3]
        dims = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        record = 1
        for d in dims[1:]:
            record *= d
        n = min(n, dims[0])
        body = f.read(n * record)  # uint8 data: the only type the Fashion-MNIST files use
    dims[0] = n
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(dst, "wb") as f:
        f.write(magic + struct.pack(f">{ndim}I", *dims) + body)


def print_plan(manifest: dict) -> None:
    parts = manifest["parts"]
    total = sum(p["bytes"] for p in parts) + manifest["core_bytes"]
    print(f"payload: {manifest['payload']['bytes'] / MIB:.1f} MiB in {len(parts)} part(s) of at most "
          f"{manifest['part_mib']:.1f} MiB + core {manifest['core_bytes'] / MIB:.1f} MiB = {total / MIB:.1f} MiB "
          f"carried; working tree {manifest['tree_bytes'] / MIB:.1f} MiB travels with every call")
    print(f"{len(manifest['calls'])} device calls, one right after another (the machine keeps .gpu/ only while "
          f"warm, 30 s after a call):")
    for c in manifest["calls"]:
        print(f"  call {c['call']}: run(command={c['command']!r}, carry={json.dumps(c['carry'])}, "
              f"timeout_s={c['timeout_s']})   # {(c['carried_bytes'] + manifest['tree_bytes']) / MIB:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--stage", type=Path, required=True, help="folder with big/ and core/")
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--repo", type=Path, default=Path("."))
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--limit-mib", type=float, default=64.0)
    c = sub.add_parser("check")
    c.add_argument("--gpu-dir", type=Path, default=Path(".gpu"))
    j = sub.add_parser("join")
    j.add_argument("--gpu-dir", type=Path, default=Path(".gpu"))
    j.add_argument("--dest", type=Path, required=True)
    s = sub.add_parser("stamp")
    s.add_argument("--repo", type=Path, default=Path("."))
    s.add_argument("--gpu-dir", type=Path, default=Path(".gpu"))
    t = sub.add_parser("tree")
    t.add_argument("--repo", type=Path, default=Path("."))
    t.add_argument("--gpu-dir", type=Path, default=Path(".gpu"))
    w = sub.add_parser("wheels")
    w.add_argument("--list", type=Path, default=Path("benchmarks/gpu/wheels.txt"))
    w.add_argument("--cache", type=Path, required=True)
    w.add_argument("--stage", type=Path, required=True)
    w.add_argument("--print", choices=["wheel", "sdist"], help="only print the requirements fetched this way")
    i = sub.add_parser("idx-head")
    i.add_argument("src", type=Path)
    i.add_argument("dst", type=Path)
    i.add_argument("n", type=int)
    args = ap.parse_args(argv)

    if args.cmd == "pack":
        manifest = pack(args.stage, args.out, args.repo, args.part_mib, args.limit_mib)
        print_plan(manifest)
    elif args.cmd == "check":
        manifest = find_manifest(args.gpu_dir)
        if manifest is None:
            print(f"have: nothing under {args.gpu_dir}/call*/ yet")
            return 0
        ok, bad = check_parts(args.gpu_dir, manifest)
        print(f"have: {len(ok)}/{len(manifest['parts'])} parts intact ({' '.join(ok) or '-'}); "
              f"still to come: {', '.join(bad) or 'none'}")
    elif args.cmd == "join":
        print(f"join: payload in {join(args.gpu_dir, args.dest)}")
    elif args.cmd == "stamp":
        final = max(args.gpu_dir.glob("call*"), key=lambda p: int(p.name[4:]), default=None)
        if final is None:
            raise SystemExit(f"stamp: no {args.gpu_dir}/call* folder: pack first")
        info = stamp(args.repo, final)
        print(f"stamp: {info['commit'][:12]}{' (uncommitted changes here)' if info['dirty_here'] else ''}, "
              f"{len(info['files'])} files, in {final / STAMP}")
    elif args.cmd == "tree":
        print(tree_line(args.repo, args.gpu_dir))
    elif args.cmd == "wheels":
        if args.print:
            print("\n".join(f"{n}=={v}" for _, n, v, how in read_wheel_list(args.list) if how == args.print))
            return 0
        missing = select_wheels(args.list, args.cache, args.stage)
        if missing:
            raise SystemExit(f"wheels: not in {args.cache}: {', '.join(missing)}")
        uncovered = uncovered_requirements(sorted(args.stage.glob("*/wheels/*.whl")))
        if uncovered:
            raise SystemExit("wheels: requirements neither carried nor in the device image (add them to "
                             f"{args.list}): {'; '.join(uncovered)}")
    elif args.cmd == "idx-head":
        idx_head(args.src, args.dst, args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
