"""DALI index files: what DALI's webdataset reader is told to read, checked against the tars, and cut to the epoch
plan.

DALI's ``fn.readers.webdataset`` reads a sample's members at the offsets and sizes its index file gives and never
looks at the tar headers. It checks only that an offset lies inside the file, and by default reads through a
memory map: an entry whose member runs past the end of the file (a tar truncated or rewritten after its index was
written) makes the decoder read past the mapping and the process die of SIGSEGV with no message. An index that no
longer describes its tar (a shard rewritten in place, a region overwritten) feeds the decoder whatever bytes now
sit at those offsets. So before a shard is read, :func:`read_entries` checks every entry the loader will use
against the file: inside it, and pointing at a valid tar header (checksum, size, name) of the member it names.
Samples that fail are *bad samples* (counted and replaced, like images that do not decode), never a crash.

The epoch plan (:mod:`pipeline.data.plan`) gives each rank contiguous spans of shards. :class:`RankOrder` lays a
rank's spans out as positions, shuffles each span in blocks of ``loader.shuffle_buffer`` samples, replaces bad
samples by another sample of the same batch, and writes one small derived index file per run of positions in
the same shard, so the reader reads exactly this rank's samples in a known order (``random_shuffle`` off): batch
``b`` of the epoch is positions ``b*B .. (b+1)*B - 1``. Knowing the order is what lets the loader find, replace
and count an image that does not decode, and restart the pipeline at the same batch.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.shards import ShardError

TAR_BLOCK = 512


@dataclass(frozen=True)
class ShardRef:
    """One shard as DALI opens it: ``url`` (a local path or an ``s3://`` URL), its DALI ``index`` file (local),
    ``count`` samples (what the epoch plan counts) and ``size`` in bytes when known."""

    url: str
    index: str
    count: int
    size: int | None = None

    @property
    def local(self) -> bool:
        return "://" not in self.url


@dataclass(frozen=True)
class Fields:
    """Which members a sample must or may have, by extension: the image (the first of ``image_exts`` present),
    the label member and the caption member (``cls``, ``txt`` or ``json``; None when not read)."""

    image_exts: tuple[str, ...]
    label_ext: str | None = None
    text_ext: str | None = None
    require_text: bool = False

    @property
    def reader_exts(self) -> list[str]:
        """The ``ext`` argument of the reader: one entry per output (image, then label, then caption)."""
        return [";".join(self.image_exts)] + [e for e in (self.label_ext, self.text_ext) if e]


@dataclass
class Entries:
    """One shard's index lines as written (DALI's reader ignores the members it is not asked for), and the samples
    that cannot be read with the reason (no image, no caption when one is needed, a failed check against the tar).
    A line with two image members keeps only the preferred one (``Fields.image_exts`` order), as the stream reader
    and the torch backend pick it."""

    shard: ShardRef
    version: str
    lines: list[bytes]
    bad: dict[int, str] = field(default_factory=dict)
    fixed: dict[int, bytes] = field(default_factory=dict)
    """Lines with two image members, cut to the preferred one."""

    def members(self, sample: int) -> list[tuple[str, int, int, str | None]]:
        """(ext, offset, size, member name or None) of every member of the sample's line."""
        parts = self.lines[sample].decode("utf-8", "replace").split()
        per = 4 if self.version == "v1.2" else 3
        return [(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3] if per == 4 else None)
                for i in range(0, len(parts) - per + 1, per)]

    def image_member(self, sample: int, image_exts: tuple[str, ...]) -> tuple[int, int, str]:
        """(offset, size, member name) of the sample's image."""
        members = self.members(sample)
        ext, off, size, name = next(m for e in image_exts for m in members if m[0] == e)
        return off, size, name or f"sample {sample}.{ext}"


def _header_ok(block: bytes, size: int, name: str | None) -> str | None:
    """Why the 512-byte tar header ``block`` does not describe a member of ``size`` bytes named ``name`` (None
    when it does)."""
    if len(block) < TAR_BLOCK or not block.strip(b"\0"):
        return "no tar header before it (zeroed or overwritten)"
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return "a damaged tar header (checksum field)"
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        return "a damaged tar header (checksum mismatch)"
    raw = block[124:136]
    if raw[0] & 0x80:  # GNU base-256 size for members >= 8 GiB
        hsize = int.from_bytes(raw[1:], "big")
    else:
        try:
            hsize = int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return "a damaged tar header (size field)"
    if hsize != size:
        return f"the tar header says {hsize} bytes, the index {size}"
    if name and len(name) < 100:  # longer names live in GNU/pax extension records before this header
        hname = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
            hname = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + hname
        if hname != name:
            return f"the tar header names {hname!r}"
    return None


def _per_line(exts, body: bytes, starts: np.ndarray) -> np.ndarray:
    """How many member extension tokens of ``exts`` each line of ``body`` has (lines begin at ``starts``): one
    literal scan of the whole text per extension, not one call per line (an extension is the token before an
    offset)."""
    pos = []
    for ext in exts:
        for m in re.finditer(re.escape(ext.encode()) + rb" \d", body):
            i = m.start()
            if i == 0 or body[i - 1] in b" \n":
                pos.append(i)
    return np.bincount(np.searchsorted(starts, np.array(pos, dtype=np.int64), side="right") - 1,
                       minlength=len(starts))


def read_index_lines(shard: ShardRef) -> tuple[str, list[bytes]]:
    """The format version and the first ``shard.count`` sample lines of ``shard.index``."""
    try:
        with open(shard.index, "rb") as f:
            header = f.readline().decode("utf-8", "replace").split()
            body = f.read()
    except OSError as exc:
        raise ShardError(f"cannot read the DALI index {shard.index} of {shard.url}: {exc}") from exc
    if len(header) != 2 or not header[0].startswith("v1."):
        raise ShardError(f"{shard.index} is not a DALI webdataset index (header {' '.join(header)!r}); "
                         f"recreate it with: pipeline shards index {shard.url}")
    lines = body.rstrip().split(b"\n") if body.strip() else []
    del lines[shard.count :]
    return header[0], lines


def read_entries(shard: ShardRef, fields: Fields, check: bool = True, probes: int = 32) -> Entries:
    """Read ``shard.index`` (DALI format v1.0-v1.2) into :class:`Entries`; with ``check`` (local shards) its
    members are checked against the tar (see :func:`_check_members`), and remote shards of known size against
    that size. Lines are only split where needed: a shard's index has one line per sample, and a rank reads
    the indexes of its whole share at every epoch start."""
    version, lines = read_index_lines(shard)
    body = b"\n".join(lines)
    starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == 10) + 1]).astype(np.int64)
    entries = Entries(shard, version, lines)
    images = _per_line(fields.image_exts, body, starts)[: len(lines)]
    for sample in np.flatnonzero(images == 0).tolist():
        entries.bad[sample] = f"no {'/'.join(fields.image_exts)} member"
    if fields.require_text and fields.text_ext:
        texts = _per_line([fields.text_ext], body, starts)[: len(lines)]
        for sample in np.flatnonzero((texts == 0) & (images > 0)).tolist():
            entries.bad[sample] = f"no {fields.text_ext} member (the recipe needs captions)"
    for sample in np.flatnonzero(images > 1).tolist():
        if sample not in entries.bad:
            lines[sample] = entries.fixed[sample] = _keep_one_image(entries, sample, fields.image_exts)
    for sample in range(len(lines), shard.count):
        entries.bad[sample] = f"not in the index {shard.index} ({len(lines)} samples)"
        lines.append(b"")
    if check and shard.local:
        entries.bad.update(_check_members(entries, probes))
    elif shard.size is not None:
        entries.bad.update(_past_the_end(entries, shard.size))
    return entries


def _keep_one_image(entries: Entries, sample: int, image_exts: tuple[str, ...]) -> bytes:
    per = 4 if entries.version == "v1.2" else 3
    parts = entries.lines[sample].split()
    comps = [parts[i : i + per] for i in range(0, len(parts) - per + 1, per)]
    image = next(e.encode() for e in image_exts if any(c[0] == e.encode() for c in comps))
    kept, seen = [], False
    for c in comps:
        if c[0].decode() in image_exts:
            if c[0] != image or seen:
                continue
            seen = True
        kept.append(c)
    return b" ".join(b" ".join(c) for c in kept)


def _past_end(size: int) -> str:
    return f"its member runs past the end of the file ({size} bytes): truncated or rewritten after its index"


def _past_the_end(entries: Entries, size: int) -> dict[int, str]:
    """Samples with a member past ``size``. Members of a tar lie in file order, so only the last lines can be
    past the end: they are checked from the last one back to the first one inside the file."""
    bad: dict[int, str] = {}
    for sample in range(len(entries.lines) - 1, -1, -1):
        if sample in entries.bad:
            continue
        if not any(off + n > size for _, off, n, _ in entries.members(sample)):
            break
        bad[sample] = _past_end(size)
    return bad


def _check_members(entries: Entries, probes: int = 32) -> dict[int, str]:
    """The members of a local shard against its file: past its end (see :func:`_past_the_end`), and the tar
    headers of ``probes`` samples spread over the shard (first and last included); if one of those does not match,
    every header. A shard rewritten or truncated after its index was written fails the probes; a damaged region
    between probes surfaces as images that do not decode: the loader finds and replaces those, and has this shard
    checked in full (``probes`` = all)."""
    shard = entries.shard
    try:
        fd = os.open(shard.url, os.O_RDONLY)
    except OSError as exc:
        raise ShardError(f"cannot open shard {shard.url}: {exc}") from exc
    try:
        bad = _past_the_end(entries, os.fstat(fd).st_size)

        def header_problem(sample: int) -> str | None:
            for _, off, n, name in entries.members(sample):
                if off < TAR_BLOCK:
                    return f"{name or 'member'} at offset {off}: no room for a tar header before it"
                why = _header_ok(os.pread(fd, TAR_BLOCK, off - TAR_BLOCK), n, name)
                if why:
                    return f"{name or 'member'} at offset {off}: {why}"
            return None

        usable = [i for i in range(len(entries.lines)) if i not in entries.bad and i not in bad]
        step = max(1, len(usable) // max(1, probes - 1))
        probe = sorted({*usable[::step], *usable[-1:]})
        if any(header_problem(i) for i in probe):
            for i in usable:
                why = header_problem(i)
                if why:
                    bad[i] = why
    finally:
        os.close(fd)
    return bad


@dataclass
class _Checked:
    sig: tuple
    bad: dict[int, str]
    fixed: dict[int, bytes]


class EntryCache:
    """:class:`Entries` of recently used shards. A shard's lines are scanned and checked once per process, for as
    long as a local file keeps its size and modification time; later epochs only read its index."""

    def __init__(self, fields: Fields, keep: int = 8) -> None:
        self.fields, self.keep = fields, keep
        self._recent: OrderedDict[str, tuple[tuple, Entries]] = OrderedDict()
        self._checked: dict[str, _Checked] = {}

    @staticmethod
    def _sig(shard: ShardRef) -> tuple:
        if not shard.local:
            return ("remote", shard.size)
        try:
            st = os.stat(shard.url)
        except OSError as exc:
            raise ShardError(f"shard {shard.url} is missing: {exc}") from exc
        return (st.st_size, st.st_mtime_ns)

    def _store(self, shard: ShardRef, sig: tuple, entries: Entries) -> None:
        self._checked[shard.url] = _Checked(sig, dict(entries.bad), dict(entries.fixed))
        self._recent[shard.url] = (sig, entries)
        self._recent.move_to_end(shard.url)
        if len(self._recent) > self.keep:
            self._recent.popitem(last=False)

    def get(self, shard: ShardRef) -> Entries:
        sig = self._sig(shard)
        hit = self._recent.get(shard.url)
        if hit is not None and hit[0] == sig:
            self._recent.move_to_end(shard.url)
            return hit[1]
        known = self._checked.get(shard.url)
        if known is not None and known.sig == sig:
            version, lines = read_index_lines(shard)
            for i, line in known.fixed.items():
                lines[i] = line
            lines += [b""] * (shard.count - len(lines))
            entries = Entries(shard, version, lines, dict(known.bad), dict(known.fixed))
            self._store(shard, sig, entries)
            return entries
        return self._scan(shard, sig, probes=32)

    def _scan(self, shard: ShardRef, sig: tuple, probes: int) -> Entries:
        entries = read_entries(shard, self.fields, check=True, probes=probes)
        self._store(shard, sig, entries)
        return entries

    def check_fully(self, shard: ShardRef) -> dict[int, str]:
        """Check every header of a local shard (after one of its images did not decode); returns its bad samples."""
        if not shard.local:
            return self.bad(shard)
        return self._scan(shard, self._sig(shard), probes=1 << 62).bad

    def bad(self, shard: ShardRef) -> dict[int, str]:
        known = self._checked.get(shard.url)
        if known is not None and known.sig == self._sig(shard):
            return known.bad
        return self.get(shard).bad


# ---------------------------------------------------------------------------------------------------------------
# One rank's epoch as positions


@dataclass
class RankOrder:
    """A rank's samples of one epoch in reading order: position ``p`` reads sample ``sample[p]`` of shard
    ``shard[p]`` (an index into the loader's shard list); ``replaced[p]`` marks a bad sample replaced by another
    sample of its batch (``origin`` keeps what the plan had there, for messages)."""

    shard: np.ndarray
    sample: np.ndarray
    replaced: np.ndarray
    origin: dict[int, tuple[int, int, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.shard)


def block_shuffled(spans: list[tuple[int, int, int]], block: int, rng: np.random.Generator | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``spans`` (shard, start, stop) laid end to end, each span shuffled in blocks of ``block``
    samples (no shuffle when ``rng`` is None)."""
    total = sum(stop - start for _, start, stop in spans)
    shard = np.empty(total, dtype=np.int64)
    sample = np.empty(total, dtype=np.int64)
    pos = 0
    for s, start, stop in spans:
        n = stop - start
        shard[pos : pos + n] = s
        ids = np.arange(start, stop, dtype=np.int64)
        if rng is not None and block > 1:
            for lo in range(0, n, block):
                ids[lo : lo + block] = rng.permutation(ids[lo : lo + block])
        sample[pos : pos + n] = ids
        pos += n
    return shard, sample


def replace_bad(shard: np.ndarray, sample: np.ndarray, bad: dict[int, dict[int, str]], batch_size: int,
                names: list[str]) -> RankOrder:
    """Replace every position whose sample is in ``bad`` (shard -> sample -> reason) by the nearest good sample of
    the same batch, from the same shard if the batch has one (one run less in the derived index); a batch with no
    good sample takes the nearest good one outside it. Raises when no position is readable."""
    shard, sample = shard.copy(), sample.copy()
    replaced = np.zeros(len(shard), dtype=bool)
    for s, samples in bad.items():
        if samples:
            ids = np.fromiter(samples, dtype=np.int64, count=len(samples))
            replaced |= (shard == s) & np.isin(sample, ids)
    origin: dict[int, tuple[int, int, str]] = {}
    if not replaced.any():
        return RankOrder(shard, sample, replaced, origin)
    good = np.flatnonzero(~replaced)
    if len(good) == 0:
        p = int(np.flatnonzero(replaced)[0])
        raise ShardError(f"no readable sample in this rank's share of the epoch; e.g. {names[shard[p]]} sample "
                         f"{sample[p]}: {bad[int(shard[p])][int(sample[p])]}")
    for p in np.flatnonzero(replaced):
        p = int(p)
        lo, hi = p - p % batch_size, min(len(shard), p - p % batch_size + batch_size)
        cands = lo + np.flatnonzero(~replaced[lo:hi])
        if len(cands):
            same = cands[shard[cands] == shard[p]]
            pool = same if len(same) else cands
        else:
            pool = good
        q = int(pool[np.argmin(np.abs(pool - p))])
        origin[p] = (int(shard[p]), int(sample[p]), bad[int(shard[p])][int(sample[p])])
        shard[p], sample[p] = shard[q], sample[q]
    return RankOrder(shard, sample, replaced, origin)


def runs(order: RankOrder, first: int) -> list[tuple[int, np.ndarray]]:
    """Positions ``first ..`` of ``order`` as runs of consecutive positions in the same shard: (shard, samples)."""
    shard, sample = order.shard[first:], order.sample[first:]
    if not len(shard):
        return []
    cuts = np.flatnonzero(np.diff(shard)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(shard)]])
    return [(int(shard[a]), sample[a:b]) for a, b in zip(starts, stops)]


def write_run_indexes(run_list: list[tuple[int, np.ndarray]], ref_of: Callable[[int], ShardRef], cache: EntryCache,
                      folder: Path) -> list[str]:
    """One derived index file per run (the run's samples, in order, from the shard's checked entries), named by
    content so a rebuild at the same epoch reuses the files of runs it did not change. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s, samples in run_list:
        ref = ref_of(s)
        digest = hashlib.sha1(ref.url.encode() + b"\0" + ref.index.encode() + b"\0" + samples.tobytes()).hexdigest()
        path = folder / f"{digest[:20]}.idx"
        if not path.exists():
            entries = cache.get(ref)
            lines = entries.lines
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(f"{entries.version} {len(samples)}\n".encode())
                f.write(b"\n".join([lines[i] for i in samples.tolist()]))
                f.write(b"\n")
            os.replace(tmp, path)
        out.append(str(path))
    return out
