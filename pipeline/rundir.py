"""File hygiene of a run directory, shared by the trainer and the launchers (no torch import: the Slurm launcher's
submitting process does without it).

Whoever can write into a run directory can make a resumed run read what they wrote there, so nothing in it is
group- or world-writable, whatever the user's umask; and a file a reader may pick up (``config.yaml``,
``summary.json``, checkpoints, ``latest``) appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def owner_writes_only() -> Iterator[None]:
    """Files and folders created in this block (by this process, its children, and a Slurm job submitted from it:
    sbatch passes the umask on) are not group- or world-writable. The umask is per process: the block is meant for
    one job's whole lifetime, not for threads that want different modes."""
    before = os.umask(0o022)
    os.umask(before | 0o022)
    try:
        yield
    finally:
        os.umask(before)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: a reader sees the old or the new file,
    never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
