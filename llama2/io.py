"""Atomic writes: a file or directory appears whole, under its final name, or not at all.

Everything is written beside its destination under a hidden temporary name, flushed to disk
(the data, then the directory entry), and renamed into place; on any error the temporary is
removed and the destination is left as it was. The one place for these in the package.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskFullError(OSError):
    """A write that failed for want of space, named by its device and the path written."""

    def __init__(self, path: str | Path):
        self.message = f"no space left on {device_of(path)} writing {path}"
        super().__init__(errno.ENOSPC, self.message, str(path))

    def __str__(self) -> str:
        return self.message


def device_of(path: str | Path) -> str:
    """The filesystem holding `path`, as `df` names it: "tmpfs at /mnt/small"."""
    mount = Path(os.path.abspath(path))
    while not mount.exists() or not os.path.ismount(mount):
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as f:  # (Linux; elsewhere the mount point alone)
            sources = {line.split()[1]: line.split()[0] for line in f if len(line.split()) > 1}
    except OSError:
        sources = {}
    source = sources.get(str(mount))
    return f"{source} at {mount}" if source else str(mount)


def free_bytes(path: str | Path) -> int:
    """Space left for writing on the filesystem of `path` (or of its nearest parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserve
    return blocks * st.f_frsize


def disk_full(path: str | Path, error: BaseException) -> bool:
    """Did writing under `path` fail for want of space? An ENOSPC anywhere in the error's
    chain says so; torch's writers drop the errno ("unexpected pos 704 vs 598"), so a failed
    write on a filesystem left with under 1 MiB free counts too (asked before the partial
    files are removed)."""
    if isinstance(error, KeyboardInterrupt | SystemExit | GeneratorExit):
        return False  # (not Exception: torch's CheckpointException is a BaseException too)
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):  # safetensors
            return True
        e = e.__cause__ or e.__context__
    if isinstance(error, ValueError):  # ours: a refusal, whatever the space
        return False
    try:
        return free_bytes(path) < 2**20
    except OSError:
        return False


@contextmanager
def removed_on_error(tmp: Path, dst: str | Path) -> Iterator[None]:
    """Around writing the temporary `tmp` (a file or directory) of `dst`: on any error `tmp`
    is removed, and a full disk is reported as one (DiskFullError naming the device)."""
    try:
        yield
    except BaseException as e:
        full = disk_full(tmp, e)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if full:  # named by what was being written (not a temporary inside it)
            raise DiskFullError(dst) from e
        raise


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
    with removed_on_error(tmp, dst):
        yield tmp
        fsync(tmp)
        os.replace(tmp, dst)
        fsync(dst.parent)


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
    with removed_on_error(tmp, dst):
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


def read_text(path: str | Path, what: str = "", error: type[ValueError] = ValueError) -> str:
    """A UTF-8 file's text; a file that cannot be read or is not UTF-8 raises `error` naming
    the file (and `what` it was read as)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read{f' {what}' if what else ''}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: invalid UTF-8 at byte {e.start}") from e


def read_json(path: str | Path, what: str = "JSON"):
    """A JSON file's value, every failure (unreadable, not UTF-8, not JSON) as a ValueError
    naming the file."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e.msg} (line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:  # NaN; arrays nested past Python's stack
        raise ValueError(f"{path}: invalid JSON: {e}") from e
