"""Atomic writes: a file or directory appears whole, under its final name, or not at all.

Everything is written beside its destination under a hidden temporary name, flushed to disk
(the data, then the directory entry), and renamed into place; on any error the temporary is
removed and the destination is left as it was. The one place for these in the package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (and `path` itself)."""
    for p in sorted(path.rglob("*")):
        if not p.is_symlink():
            fsync(p)
    fsync(path)


@contextmanager
def atomic_file(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dst` to write to (by any writer that takes a path);
    renamed to `dst` when the block ends without error."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, dst)
        fsync(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(dst: str | Path, data: bytes | str) -> Path:
    """Write bytes (or UTF-8 text) to `dst` atomically."""
    with atomic_file(dst) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(dst)


@contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dst`, renamed to `dst` only on success.
    An existing non-empty `dst` is refused unless `overwrite`, and then replaced only once
    the new one is complete."""
    dst = Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists and is not empty")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)  # on disk before the rename makes them visible
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
            os.replace(dst, old / "x")
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old / "x", dst)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
        fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def point_link(link: Path, target: Path) -> None:
    """Make the symlink `link` point at `target` (relative to the link's directory), replacing
    any previous link in one rename: readers see the old target or the new, never neither."""
    tmp = link.with_name(f".{link.name}.tmp-link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)
    fsync(link.parent)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str):
    """json.loads without Python's extensions NaN, Infinity and -Infinity (not JSON: a NaN
    margin or learning rate would poison a model silently)."""
    return json.loads(text, parse_constant=_no_constant)


def read_json(path: str | Path, what: str = "JSON"):
    """A JSON file's value, every failure (unreadable, not UTF-8, not JSON) as a ValueError
    naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from e
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e.msg} (line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:  # NaN; arrays nested past Python's stack
        raise ValueError(f"{path}: invalid JSON: {e}") from e
