"""The one atomic writer: complete or nothing, no temporary left behind, the previous content kept on failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantserve.kernels.atomic_write import atomic_directory, atomic_file, atomic_write_bytes, atomic_write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_is_written_whole_with_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert path.read_text() == "two" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_file_write_keeps_the_old_content(tmp_path: Path, interrupt: type[BaseException]) -> None:
    path = tmp_path / "cache.json"
    path.write_text("old")
    with pytest.raises(interrupt):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".cache.json.")
            tmp.write_text("half")
            raise interrupt("stop")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_a_writer_that_replaces_the_temporary_file_is_fine(tmp_path: Path) -> None:
    """A compiler or writer may unlink and recreate its output path (as a linker does)."""
    path = tmp_path / "lib.so"
    with atomic_file(path) as tmp:
        tmp.unlink()
        tmp.write_bytes(b"elf")
    assert path.read_bytes() == b"elf" and [p.name for p in tmp_path.iterdir()] == ["lib.so"]


def test_a_killed_writer_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    code = ("import os, signal, sys\n"
            "from quantserve.kernels.atomic_write import atomic_file\n"
            "with atomic_file(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old"


def test_a_directory_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "model"
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    with atomic_directory(out) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"w")
    assert [p.name for p in out.iterdir()] == ["weights.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_directory_write_keeps_the_old_directory(tmp_path: Path,
                                                                interrupt: type[BaseException]) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(interrupt):
        with atomic_directory(out) as tmp:
            (tmp / "config.json").write_text("half")
            raise interrupt("stop")
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
