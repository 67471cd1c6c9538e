"""Atomic writes, written once: a temporary file or directory beside the target, renamed over it when complete.

An exception or interrupt mid-write leaves the previous file or directory as it was and removes the temporary; a
reader never sees a half-written one. The temporaries are dot-names in the target's directory (a rename never
crosses file systems) and get the permissions a plain `open` or `mkdir` would (the umask's), not mkstemp's 0600.
It lives in kernels, the bottom layer, so that every layer may import it (kernels' build cache, runtime's configs,
checkpoints and autotune cache, serve, the digits model, the CLI); it needs only the standard library.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "atomic_write_bytes", "atomic_write_text", "replace_directory"]


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside `path`: .NAME.KIND-RANDOM."""
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(6)}")


def _new_file(path: Path) -> Path:
    """Create an empty temporary file beside `path`, mode 0666 less the umask (as open() would make it)."""
    while True:
        tmp = _sibling(path, "tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _new_directory(path: Path) -> Path:
    """Create an empty temporary directory beside `path`, mode 0777 less the umask (as mkdir would make it)."""
    while True:
        tmp = _sibling(path, "tmp")
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    """Flush a finished file to disk before it is renamed into place (a writer may have replaced it: skip then)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` (an empty file) to write; when the block ends it is flushed and renamed
    over `path`; when the block raises it is removed and `path` is left as it was."""
    target = Path(path)
    tmp = _new_file(target)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def replace_directory(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Move a finished directory `tmp` to `out` (a sibling), replacing what was there only once `tmp` is complete;
    the previous `out` is put back if the last rename fails."""
    tmp, out = Path(tmp), Path(out)
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside `path` (its parent created if missing) to fill; when the block ends it
    replaces `path`; when the block raises it is removed and `path` is left as it was."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_directory(out)
    try:
        yield tmp
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
