"""Folders written whole or not at all.

`atomic_folder(out)` hands out a temporary sibling of `out`; when the block ends without an error, every file in it
is fsynced, its sha256 recorded in `checksums.json` (which `sources.load_model` verifies), and the folder renamed
to `out` (replacing an older one). On an error, or if the process dies, nothing is at `out`: a killed writer's
temporary `.NAME-PID-*` folder is removed by the next write into the same parent once that PID is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmpress.hashing import sha256_file
from llmpress.services import alive

CHECKSUMS = "checksums.json"  # sources.load_model reads it back


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        write_checksums(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_checksums(folder: Path) -> None:
    """fsync each file of `folder` and record its sha256 in `checksums.json` (itself fsynced), then the folder."""
    sums = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        sums[path.relative_to(folder).as_posix()] = sha256_file(path)
    with open(folder / CHECKSUMS, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(sums, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(parent: Path) -> None:
    """Remove `.NAME-PID-*` folders whose writing process no longer exists (killed mid-save)."""
    for tmp in parent.glob(".*-*-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if tmp.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def check_destination(dst: str | Path, sources: list[str | Path], overwrite: bool = False) -> Path:
    """Refuse a folder a command would write before anything is read: one that holds or is inside a source (writing
    it would change or delete the source), an existing one unless `overwrite`, and with `overwrite` anything but a
    model folder llmpress wrote or an empty folder (so a mistyped path never deletes someone's files)."""
    from llmpress.errors import LlmpressError

    out = Path(dst).resolve()
    for source in sources:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise LlmpressError(f"destination {dst} is inside the source {source}: writing it would change the source")
        if out in src.parents:
            raise LlmpressError(f"destination {dst} contains the source {source}: replacing it would delete the source")
    if blocker := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise LlmpressError(f"destination {dst} cannot be made: {blocker} is a file, not a folder")
    if not out.exists():
        return out
    if not out.is_dir():
        raise LlmpressError(f"destination {dst} exists and is not a folder")
    if not overwrite:
        raise LlmpressError(f"destination {dst} already exists; pass --overwrite to replace it")
    if any(out.iterdir()) and not ((out / CHECKSUMS).is_file() and (out / "config.json").is_file()):
        raise LlmpressError(f"destination {dst} is not a model folder llmpress wrote (no {CHECKSUMS} and "
                            "config.json); refusing to replace it even with --overwrite")  # fmt: skip
    return out
