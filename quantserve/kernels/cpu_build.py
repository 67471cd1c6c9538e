"""Build quantserve's native CPU kernels (kernels/csrc/*.c) into a shared library, once per machine, and load it.

The library is compiled with the system C compiler (`$CC`, else cc/gcc/clang) for this very CPU (-march=native:
the AVX-512 intrinsics paths where the processor has AVX-512; elsewhere the portable C, which the compiler
auto-vectorizes for whatever the CPU has, e.g. AVX2: there is no hand-written AVX2 path), with OpenMP, and without
floating-point contraction (no fused multiply-add), so the kernels' values equal the torch reference's bit for bit.
It is cached under `$QUANTSERVE_CACHE_DIR/cpu-kernels/` (default: the user cache directory) by a hash of the
sources, the compiler, its flags and the CPU's features (`$QUANTSERVE_CPU_CFLAGS` adds flags, e.g.
`-march=x86-64-v3` or `-march=x86-64-v2` to build the portable code for an AVX2 or an older CPU on a machine that
has AVX-512); the first use on a machine compiles (about 2 s), later ones load. The compiled
file is written to a temporary name and renamed into place, so two processes building at once never see half a
library.

The sources, all compiled into the one library (every csrc/*.c; the headers are csrc/*.h): qs_cpu.h, the ABI
(mirrored by cpu_abi.py, checked by qs_abi.c); qs_decode.c, the non-GGUF formats' row decoders and qs_dequantize, and
qs_dot.c, their fused row dots and qs_gemv (sharing qs_packed.h), and qs_gemm.c, the fused dequantize-GEMM for a few
dozen activation rows (AMX, AVX512-BF16 or portable float32; decoders of its own for the common formats); qs_gguf_decode.c, the portable GGUF decoders and
their dispatch, qs_gguf_decode_avx512.c, the AVX-512 GGUF decoders, and qs_gguf_dot.c, the fused GGUF dots (sharing
qs_gguf.h); qs_quantize.c, the int8 quantizers; qs_scalar.h, the exact scalar float conversions.

    python -m quantserve.kernels.cpu_build     # build now and print where the library is and what it uses
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from .atomic_write import atomic_file

SOURCE_DIR = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-fPIC",
         "-shared", "-Wall", "-Wno-unused-function")
LIBRARY_NAME = "libquantserve_cpu.so"


class CpuKernelsUnavailable(RuntimeError):
    """The native CPU kernels cannot be built or loaded here; the message says why and what would fix it."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_problem: str | None = None


def cache_dir() -> Path:
    """$QUANTSERVE_CACHE_DIR/cpu-kernels, else the user cache directory's quantserve/cpu-kernels."""
    configured = os.environ.get("QUANTSERVE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser() / "cpu-kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("quantserve")) / "cpu-kernels"


def compiler() -> str:
    """The C compiler to use: $CC, else the first of cc, gcc, clang on PATH."""
    configured = os.environ.get("CC")
    if configured:
        return configured
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    raise CpuKernelsUnavailable("no C compiler found (set $CC, or install gcc: apt-get install gcc) to build "
                                "quantserve's CPU kernels")


def sources() -> list[Path]:
    """Every C source of the library (csrc/*.c), in name order."""
    found = sorted(SOURCE_DIR.glob("*.c"))
    if not found:
        raise CpuKernelsUnavailable(f"no C sources in {SOURCE_DIR}: the quantserve installation is incomplete")
    return found


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def flags() -> tuple[str, ...]:
    """The compiler flags: FLAGS, then whatever $QUANTSERVE_CPU_CFLAGS adds (later flags win)."""
    return FLAGS + tuple(os.environ.get("QUANTSERVE_CPU_CFLAGS", "").split())


def build_key(cc: str) -> str:
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CpuKernelsUnavailable(f"the C compiler {cc!r} does not run: {exc}") from None
    for part in (version, " ".join(flags()), platform.machine(), _cpu_features()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(force: bool = False) -> Path:
    """Compile the library for this machine unless the cache has it; returns its path."""
    cc = compiler()
    target = cache_dir() / build_key(cc) / LIBRARY_NAME
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        cmd = [cc, *flags(), "-I", str(SOURCE_DIR), "-o", str(tmp), *map(str, sources()), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise CpuKernelsUnavailable(f"compiling quantserve's CPU kernels failed ({' '.join(cmd)}):\n"
                                        f"{done.stderr.strip()[-4000:]}")
    return target


def _declare(lib: ctypes.CDLL) -> None:
    from ctypes import POINTER, c_char_p, c_float, c_int32, c_int64, c_void_p

    lib.qs_supported.argtypes = [c_int32, c_int32]
    lib.qs_supported.restype = c_int32
    lib.qs_dequantize.argtypes = [c_void_p, c_int64, c_int64, c_void_p, c_int32]
    lib.qs_dequantize.restype = c_int32
    lib.qs_gemv.argtypes = [c_void_p, c_void_p, c_int64, c_void_p, c_void_p]
    lib.qs_gemv.restype = c_int32
    lib.qs_gemm.argtypes = [c_void_p, c_void_p, c_int32, c_int64, c_void_p, c_int32, c_void_p, c_int32]
    lib.qs_gemm.restype = c_int32
    lib.qs_gemm_available.argtypes = [c_int32]
    lib.qs_gemm_available.restype = c_int32
    lib.qs_gemm_best_path.argtypes = [c_int32]
    lib.qs_gemm_best_path.restype = c_int32
    lib.qs_gemm_decoder.argtypes = [c_void_p, c_int32]
    lib.qs_gemm_decoder.restype = c_int32
    lib.qs_threads.argtypes = []
    lib.qs_threads.restype = c_int32
    lib.qs_isa.argtypes = []
    lib.qs_isa.restype = c_char_p
    lib.qs_gguf_decode_row.argtypes = [c_int32, c_void_p, c_int64, POINTER(c_float)]
    lib.qs_gguf_decode_row.restype = c_int32
    lib.qs_gguf_supported.argtypes = [c_int32]
    lib.qs_gguf_supported.restype = c_int32
    lib.qs_quantize_int8_absmax.argtypes = [c_void_p, c_int32, c_int64, c_int64, c_void_p, c_void_p]
    lib.qs_quantize_int8_absmax.restype = c_int32
    lib.qs_quantize_int8_symmetric.argtypes = [c_void_p, c_int32, c_int64, c_int64, c_float, c_void_p, c_void_p]
    lib.qs_quantize_int8_symmetric.restype = c_int32


def library() -> ctypes.CDLL:
    """The loaded library (built on first use); raises CpuKernelsUnavailable, with the reason, when it cannot be."""
    global _library, _problem
    if _library is not None:
        return _library
    if _problem is not None:
        raise CpuKernelsUnavailable(_problem)
    with _lock:
        if _library is None and _problem is None:
            try:
                import torch  # noqa: F401  (loads torch's OpenMP runtime first: the kernels share its thread pool)

                lib = ctypes.CDLL(str(build()))
                _declare(lib)
                _library = lib
            except CpuKernelsUnavailable as exc:
                _problem = str(exc)
            except OSError as exc:
                _problem = f"loading quantserve's CPU kernels failed: {exc}"
    if _library is None:
        raise CpuKernelsUnavailable(_problem or "quantserve's CPU kernels are unavailable")
    return _library


def problem() -> str | None:
    """None when the CPU kernels load here, else why not."""
    try:
        library()
    except CpuKernelsUnavailable as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build quantserve's native CPU kernels for this machine.")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache has the library")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
        lib = library()
    except CpuKernelsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path}\nvectorized with {lib.qs_isa().decode()}, {lib.qs_threads()} OpenMP threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
