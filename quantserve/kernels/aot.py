"""Ahead-of-time builds of quantserve's Triton kernels for real GPUs, on a machine without one.

Triton's compiler needs no GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` lowers a kernel
through TTIR, TTGIR, LLVM IR and PTX to a cubin with the `ptxas` shipped in the triton wheel, and the wheel's
`cuobjdump --dump-resource-usage` and `nvdisasm` read back registers, spill stack, shared memory and instructions.

For each target x kernel (dequantize, fused tiled, split-K, split-K reduce) x packed format x autotune config x
activation dtype (bf16, fp16) this module compiles one build in worker processes and reports: compiled or the
compiler's error (its first line), registers, spill bytes (stack / local per thread), shared memory against the
target's limit, tensor-core instructions (HMMA on sm_80/sm_89, HGMMA = wgmma on sm_90, Blackwell's UTC*MMA) and
128-bit global loads (LDG.E.128). A build the router declines on a target (below compute capability 8.0:
`api.MIN_CAPABILITY`) is reported as declined with the router's reason. Float8 codes and NVFP4's float8 block scales
are built as the router runs them on each target: converted by the GPU from sm_89, decoded by integer arithmetic on
sm_80 (`triton_args.float8_by_bits`).

Each build's arguments are those of a real launch at a FLUX linear shape (K = 3072; N = 3072; M = 4096 tiled,
M = 16 split-K): the packed weight's tile arguments come from its registered Triton spec (`triton_args.tile_args`),
and every argument is specialized the way Triton's launcher does (`native_specialize_impl`: 16-byte aligned
pointers and integers divisible by 16 get `tt.divisibility = 16`, an integer equal to 1 becomes a constant).

    python -m quantserve.kernels.aot --targets sm_80,sm_89,sm_90 --configs ends --out benchmarks/triton_aot.md
    python -m quantserve.kernels.aot --targets sm_90 --formats nf4,gguf_Q4_K --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- targets ----------------------------------------------------------------------------------------------------

GUIDE = ("NVIDIA CUDA C++ Programming Guide, 'Technical Specifications per Compute Capability' "
         "(https://docs.nvidia.com/cuda/cuda-programming-guide/05-appendices/compute-capabilities.html): "
         "'Maximum amount of shared memory per thread block' (opt-in, cudaFuncAttributeMaxDynamicSharedMemorySize) "
         "and 'Maximum number of 32-bit registers per thread'")


@dataclass(frozen=True)
class Target:
    """One GPU architecture the kernels are built for, and the limits a build is checked against."""

    name: str              # sm_XY
    capability: int        # XY, as GPUTarget takes it
    gpus: str              # example parts
    smem_per_block: int    # bytes, the opt-in maximum of dynamic shared memory per block
    regs_per_thread: int   # the most 32-bit registers one thread may use
    source: str            # where the figures come from


KIB = 1024
# ONE table of the targets' limits. Figures: the CUDA C++ Programming Guide's compute-capability table (GUIDE);
# the same figures are in NVIDIA's tuning guides: Ampere ("A100 ... up to 163 KB per thread block"), Ada (99 KB),
# Hopper ("H100 ... up to 227 KB per thread block"), Blackwell (227 KB on 10.0, 99 KB on 12.0).
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("sm_80", 80, "A100, A30", 163 * KIB, 255, f"{GUIDE}: compute capability 8.0: 163 KB, 255"),
    Target("sm_86", 86, "A10, A40, RTX 3090", 99 * KIB, 255, f"{GUIDE}: compute capability 8.6: 99 KB, 255"),
    Target("sm_89", 89, "L4, L40S, RTX 4090", 99 * KIB, 255, f"{GUIDE}: compute capability 8.9: 99 KB, 255"),
    Target("sm_90", 90, "H100, H200", 227 * KIB, 255, f"{GUIDE}: compute capability 9.0: 227 KB, 255"),
    Target("sm_100", 100, "B200, GB200", 227 * KIB, 255, f"{GUIDE}: compute capability 10.0: 227 KB, 255"),
    Target("sm_120", 120, "RTX 5090, RTX PRO 6000", 99 * KIB, 255, f"{GUIDE}: compute capability 12.0: 99 KB, 255"),
)}
DEFAULT_TARGETS = ("sm_80", "sm_89", "sm_90", "sm_100")

KERNELS = ("dequantize", "tiled", "splitk", "splitk_reduce")
DTYPES = ("bf16", "fp16")

# the FLUX linear shape every build is specialized for (see the module docstring)
FLUX_N, FLUX_K = 3072, 3072
TILED_M, SPLITK_M = 4096, 16
SPEC_N = 64  # rows of the packed weights built here: only K enters the tile arguments, N is passed as FLUX_N

# --- packed formats ---------------------------------------------------------------------------------------------


def _formats(n: int = SPEC_N) -> dict[str, Callable[[], Any]]:
    """name -> builder of a packed weight of n rows with K = FLUX_K (zeros: only dtypes, strides and constants
    count)."""
    import torch

    from . import api
    from .formats import BnB4bit
    from .gguf import BLOCK_SIZES
    from .int4 import quantize_int4_grouped

    k = FLUX_K
    u8 = torch.uint8

    def bnb(nested: bool) -> Any:
        blocks = n * k // 64
        common = dict(shape=(n, k), blocksize=64, quant_type="nf4", dtype=torch.bfloat16,
                      quant_map=torch.zeros(16))
        if nested:
            return BnB4bit(torch.zeros(n * k // 2, dtype=u8), torch.zeros(blocks, dtype=u8),
                           nested_absmax=torch.zeros(-(-blocks // 256)), nested_quant_map=torch.zeros(256),
                           nested_blocksize=256, offset=0.01, **common)
        return BnB4bit(torch.zeros(n * k // 2, dtype=u8), torch.zeros(blocks), **common)

    def gguf(qtype: str) -> Any:
        per_block, block_bytes = BLOCK_SIZES[qtype]
        return api.pack_gguf(torch.zeros(n * k // per_block * block_bytes, dtype=u8), qtype, (n, k))

    def quanto(group: int | None, bits: int) -> Any:
        g = group or k
        groups = n * k // g
        rows = -(-groups // (8 // bits))
        return api.pack_quanto_grouped(torch.zeros(rows, g, dtype=u8), torch.ones(groups, dtype=torch.bfloat16),
                                       torch.zeros(groups, dtype=torch.bfloat16), (n, k), group, bits)

    cases: dict[str, Callable[[], Any]] = {
        "nf4": lambda: bnb(False),
        "nf4_double_quant": lambda: bnb(True),
        "int8_rows_bnb": lambda: api.pack_int8_rows(torch.zeros(n, k, dtype=torch.int8), torch.ones(n),
                                                    divisor=127.0),
        "int8_rows_torchao": lambda: api.pack_int8_rows(torch.zeros(n, k, dtype=torch.int8), torch.ones(n, 1),
                                                        torch.zeros(n, 1, dtype=torch.int8), dtype=torch.bfloat16),
        "float8_e4m3_rows": lambda: api.pack_fp8(torch.zeros(n, k, dtype=torch.float8_e4m3fn), torch.ones(n)),
        "float8_e5m2_tensor": lambda: api.pack_fp8(torch.zeros(n, k, dtype=torch.float8_e5m2), torch.ones(1),
                                                   dtype=torch.bfloat16),
        "int4_torchao": lambda: quantize_int4_grouped(torch.ones(n, k), 128),
        "quanto_int4": lambda: quanto(64, 4),
        "quanto_int2": lambda: quanto(None, 2),
        "nvfp4": lambda: api.pack_nvfp4(torch.zeros(n, k // 2, dtype=u8),
                                        torch.ones(n, k // 16).to(torch.float8_e4m3fn), 0.01),
        "int4_blocks": lambda: api.pack_int4_blocks(torch.zeros(n, k // 2, dtype=u8), torch.ones(n * k // 128), 128),
    }
    for qtype in BLOCK_SIZES:
        cases[f"gguf_{qtype}"] = lambda q=qtype: gguf(q)
    return cases


def format_names() -> tuple[str, ...]:
    return tuple(_formats())


def decline_reason(fmt: str, target: Target) -> str | None:
    """The router's reason for not running quantserve's Triton kernels on `target` for `fmt` (None: it runs them).

    The same rule and words as `api.triton_problem` on a device of that compute capability."""
    from .api import MIN_CAPABILITY

    _packed(fmt)  # an unknown format is an error
    capability = divmod(target.capability, 10)
    if capability < MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}; "
                f"this GPU has {capability[0]}.{capability[1]}")
    return None


_PACKED: dict[str, Any] = {}


def packed_format(fmt: str, n: int) -> Any:
    """A zero packed weight of format `fmt` with n rows and K = FLUX_K."""
    cases = _formats(n)
    if fmt not in cases:
        raise ValueError(f"format {fmt!r}; accepted: {', '.join(cases)}")
    return cases[fmt]()


def _packed(fmt: str) -> Any:
    if fmt not in _PACKED:
        cases = _formats()
        if fmt not in cases:
            raise ValueError(f"format {fmt!r}; accepted: {', '.join(cases)}")
        _PACKED[fmt] = cases[fmt]()
    return _PACKED[fmt]


# --- builds -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Build:
    """One compile: kernel x format x config x dtype x target (format "-" for the format-free reduce kernel)."""

    target: str
    kernel: str
    fmt: str
    config: int
    dtype: str

    @property
    def key(self) -> tuple:
        return (self.target, KERNELS.index(self.kernel), self.fmt, self.config, self.dtype)


@dataclass
class Result:
    build: Build
    status: str                     # compiled, failed, declined
    config: str = ""                # the config's parameters
    reason: str = ""                # the compiler's first error line, or the router's reason
    registers: int | None = None
    stack: int | None = None        # bytes per thread (spill stack)
    local: int | None = None        # bytes per thread (local memory)
    shared: int | None = None       # bytes per block (Triton's dynamic shared memory)
    smem_limit: int = 0
    tensor_core: int | None = None  # tensor-core instructions in the SASS
    tensor_ops: str = ""            # which ones (opcode: count)
    ldg128: int | None = None       # 128-bit global loads (LDG.E.128...) in the SASS
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        return bool((self.stack or 0) + (self.local or 0))

    @property
    def over_smem(self) -> bool:
        return self.shared is not None and self.shared > self.smem_limit

    def row(self) -> dict[str, Any]:
        return {**asdict(self.build), **{k: v for k, v in asdict(self).items() if k != "build"},
                "spills": self.spills, "over_smem": self.over_smem}


def _configs(kernel: str) -> list[Any]:
    from . import triton_dequant, triton_matmul

    if kernel == "dequantize":
        return list(triton_dequant._dequant_kernel.configs)
    if kernel == "tiled":
        return list(triton_matmul._tiled_kernel.configs)
    if kernel == "splitk":
        return list(triton_matmul._splitk_kernel.configs)
    return [None]  # the reduce kernel has no autotune configs (BLOCK = 128)


def _spec(config: Any) -> dict[str, Any]:
    """A config as plain data (it crosses process boundaries)."""
    if config is None:
        return {"kwargs": {}, "num_warps": 4, "num_stages": 3}
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _volume(spec: dict[str, Any]) -> int:
    """A config's tile volume (its BLOCK_* sizes multiplied; split-K's rows are BLOCK_M = 16)."""
    volume = 1
    for k, v in spec["kwargs"].items():
        if k.startswith("BLOCK_"):
            volume *= v
    return volume if spec["kwargs"] else 0


def _cost(spec: dict[str, Any]) -> int:
    """The config's per-thread register demand (triton_common.thread_cost), 0 for configs without a weight tile."""
    from .triton_common import thread_cost

    kw = spec["kwargs"]
    if "BLOCK_N" not in kw or "BLOCK_K" not in kw:
        return 0
    return thread_cost(kw, spec["num_warps"])


def _local_config_specs() -> dict[str, list[dict[str, Any]]]:
    return {kernel: [_spec(c) for c in _configs(kernel)] for kernel in KERNELS}


def _compiled_here() -> bool:
    """Whether this process imports (or imported) the kernels compiled, not under Triton's interpreter."""
    common = sys.modules.get(f"{__package__}.triton_common")
    if common is not None:
        return not common.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "") != "1"


_SPECS: dict[str, list[dict[str, Any]]] = {}


def config_specs(kernel: str) -> list[dict[str, Any]]:
    """The autotune configs `kernel` ships for a GPU (asked of a fresh interpreter when this process imported the
    kernels under TRITON_INTERPRET=1, whose configs are the interpreter's one small tile)."""
    if not _SPECS:
        if _compiled_here():
            _SPECS.update(_local_config_specs())
        else:
            import multiprocessing

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_init) as pool:
                _SPECS.update(pool.submit(_local_config_specs).result())
    return _SPECS[kernel]


def config_volumes(kernel: str) -> list[int]:
    return [_volume(s) for s in config_specs(kernel)]


def config_count(kernel: str) -> int:
    return len(config_specs(kernel))


def budget_reason(kernel: str, fmt: str, config: int) -> str | None:
    """Why the autotuner never tries `config` of `kernel` for `fmt` (its weight tile is over the format's decode
    budget: `triton_args.decode_budget`, `triton_common.within_budget`), or None."""
    if kernel not in ("tiled", "splitk") or fmt == "-":
        return None
    from .triton_args import decode_budget, tile_args

    args = tile_args(_packed(fmt))
    budget = decode_budget(kernel, args.tile, args.consts[0], args.consts[1])
    used = _cost(config_specs(kernel)[config])
    if used > budget:
        return f"pruned: per-thread cost {used}, over the decode budget of {budget}"
    return None


def shipped(kernel: str, fmt: str) -> list[int]:
    """The configs of `kernel` the autotuner may run for `fmt` (within its decode budget)."""
    return [i for i in range(config_count(kernel)) if budget_reason(kernel, fmt, i) is None]


def extremes(kernel: str, fmt: str = "-") -> list[int]:
    """The smallest and the largest tile (by volume) among the configs shipped for `fmt`."""
    volumes = config_volumes(kernel)
    kept = shipped(kernel, fmt)
    return sorted({min(kept, key=lambda i: (volumes[i], i)), max(kept, key=lambda i: (volumes[i], i))})


def ends(kernel: str, fmt: str = "-") -> list[int]:
    """The configs "ends" builds, among those shipped for `fmt`: the first and last, and the smallest and largest
    tile (by volume; among equals the first for the smallest, the last for the largest)."""
    volumes = config_volumes(kernel)
    kept = shipped(kernel, fmt)
    smallest = min(kept, key=lambda i: (volumes[i], i))
    largest = max(kept, key=lambda i: (volumes[i], i))
    return sorted({kept[0], kept[-1], smallest, largest})


def _describe(config: Any) -> str:
    if config is None:
        return "BLOCK=128, num_warps=4"
    params = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{params}, num_warps={config.num_warps}, num_stages={config.num_stages}"


def plan(targets: Sequence[str], formats: Sequence[str], kernels: Sequence[str] = KERNELS,
         configs: str = "all", dtypes: Sequence[str] = DTYPES) -> list[Build]:
    """Every build of the product, configs "all" (those over a format's decode budget then appear as pruned),
    "ends" (see `ends`: first, last, smallest, largest of the configs shipped for each format) or "extremes" (the
    smallest and largest shipped)."""
    if configs not in ("all", "ends", "extremes"):
        raise ValueError(f"configs: {configs!r}; accepted: 'all', 'ends', 'extremes'")
    builds = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target {target!r}; accepted: {', '.join(TARGETS)}")
        for kernel in kernels:
            if kernel not in KERNELS:
                raise ValueError(f"kernel {kernel!r}; accepted: {', '.join(KERNELS)}")
            for fmt in (("-",) if kernel == "splitk_reduce" else formats):
                indices = {"all": lambda k, f: list(range(config_count(k))), "ends": ends,
                           "extremes": extremes}[configs](kernel, fmt)
                for i in indices:
                    for dtype in dtypes:
                        builds.append(Build(target, kernel, fmt, i, dtype))
    return builds


def _arguments(build: Build) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(kernel JITFunction, runtime arguments by name, constexpr arguments by name) of a real launch."""
    import torch

    from . import triton_dequant, triton_matmul
    from .triton_args import tile_args

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[build.dtype]
    act = torch.empty(16, dtype=dtype)
    f32 = torch.empty(16, dtype=torch.float32)
    config = _configs(build.kernel)[build.config]
    n, k = FLUX_N, FLUX_K
    if build.kernel == "splitk_reduce":
        return (triton_matmul._splitk_reduce_kernel,
                dict(ws_ptr=f32, y_ptr=act, bias_ptr=act, M=SPLITK_M, N=n, SPLIT=4, stride_ym=n),
                dict(HAS_BIAS=True, BLOCK=128))
    targs = tile_args(_packed(build.fmt), capability=divmod(TARGETS[build.target].capability, 10))
    w = {**dict(zip(("w_ptr0", "w_ptr1", "w_ptr2", "w_ptr3", "w_ptr4"), targs.ptrs)),
         **dict(zip(("w_arg0", "w_arg1", "w_arg2"), targs.ints))}
    consts = dict(TILE=targs.tile, W_META0=targs.consts[0], W_META1=targs.consts[1], W_META2=targs.consts[2],
                  NATIVE=targs.native, **config.kwargs)
    if build.kernel == "dequantize":
        return triton_dequant._dequant_kernel.fn, dict(out_ptr=act, stride_on=k, **w, N=n, K=k), consts
    common = dict(HAS_BIAS=True, UPCAST=False, PRECISION=None)
    if build.kernel == "tiled":
        m = TILED_M
        return (triton_matmul._tiled_kernel.fn,
                dict(x_ptr=act, y_ptr=act, bias_ptr=act, M=m, N=n, K=k, M_BUCKET=m, stride_xm=k, stride_xk=1,
                     stride_ym=n, **w), {**consts, **common})
    k_split = 768  # K = 3072 in 4 splits of 3 K units (a multiple of every BLOCK_K)
    return (triton_matmul._splitk_kernel.fn,
            dict(x_ptr=act, out_ptr=f32, bias_ptr=act, M=SPLITK_M, N=n, K=k, M_BUCKET=SPLITK_M, K_SPLIT=k_split,
                 stride_xm=k, stride_xk=1, stride_om=n, **w),
            {**consts, **common, "PARTIAL": True, "BLOCK_M": 16})


def _source(fn: Any, runtime: dict[str, Any], consts: dict[str, Any]) -> Any:
    """An ASTSource specialized as Triton's launcher specializes these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    names = fn.arg_names
    missing = sorted(set(names) - set(runtime) - set(consts))
    if missing:
        raise TypeError(f"{fn.__name__}: no value for {', '.join(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
            continue
        kind, spec = native_specialize_impl(BaseBackend, runtime[name], False, True, True)
        if kind == "constexpr":  # an integer equal to 1 (or None)
            signature[name] = "constexpr"
            constexprs[name] = spec
            continue
        signature[name] = kind
        if isinstance(spec, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: the triton wheel's {name} is missing")
    return str(path)


TENSOR_CORE = re.compile(r"\b((?:UTC\w*|H|I|Q|O|D|B)G?MMA\w*)\b")
LDG128 = re.compile(r"\bLDG\.E(?:\.\w+)*\.128\b")
RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def read_cubin(cubin: bytes, capability: int) -> dict[str, Any]:
    """Registers, stack, local memory, tensor-core ops and 128-bit loads of a cubin (the wheel's tools)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
    match = RESOURCE.search(usage)
    if match is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage: no REG/STACK/SHARED/LOCAL in {usage[:200]!r}")
    regs, stack, _static_shared, local = (int(g) for g in match.groups())
    ops = Counter(m.group(1).split(".")[0] for line in sass.splitlines() for m in [TENSOR_CORE.search(line)] if m)
    return dict(registers=regs, stack=stack, local=local, tensor_core=sum(ops.values()),
                tensor_ops=", ".join(f"{op}: {c}" for op, c in sorted(ops.items())),
                ldg128=len(LDG128.findall(sass)))


def compile_one(build: Build) -> Result:
    """Compile one build (or decline it) and read its resources."""
    target = TARGETS[build.target]
    result = Result(build, "failed", smem_limit=target.smem_per_block)
    start = time.perf_counter()
    try:
        config = _configs(build.kernel)[build.config]
        result.config = _describe(config)
        reason = None if build.fmt == "-" else decline_reason(build.fmt, target)
        if reason is not None:
            result.status, result.reason = "declined", reason
            return result
        reason = budget_reason(build.kernel, build.fmt, build.config)
        if reason is not None:
            result.status, result.reason = "pruned", reason
            return result
        import triton
        from triton.backends.compiler import GPUTarget

        fn, runtime, consts = _arguments(build)
        options = {"num_warps": 4 if config is None else config.num_warps,
                   "num_stages": 3 if config is None else config.num_stages}
        compiled = triton.compile(_source(fn, runtime, consts), target=GPUTarget("cuda", target.capability, 32),
                                  options=options)
        result.shared = int(compiled.metadata.shared or 0)
        result.__dict__.update(read_cubin(compiled.asm["cubin"], target.capability))
        result.status = "compiled"
        if result.shared > target.smem_per_block:
            # the autotuner prunes it on such a GPU (triton_common.fits_shared_memory: the same rule, the device's
            # own limit read at run time)
            result.status = "pruned"
            result.reason = (f"pruned on {target.name}: needs {result.shared / KIB:.1f} KiB of shared memory, "
                             f"the target gives a block {target.smem_per_block // KIB} KiB")
    except Exception as exc:  # the compiler's error is the result
        text = str(exc).strip() or type(exc).__name__
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        result.reason = f"{type(exc).__name__}: {(errors or lines or [text])[0]}"[:300]
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
    return result


def _worker_init() -> None:
    # the kernels must be compiled, not interpreted: Triton reads the flag when the kernel modules are imported
    os.environ.pop("TRITON_INTERPRET", None)


def run(builds: Sequence[Build], jobs: int = 2, progress: bool = True) -> list[Result]:
    """Compile `builds` in `jobs` worker processes (fresh interpreters: no TRITON_INTERPRET), in plan order."""
    import multiprocessing

    from tqdm import tqdm

    results: dict[Build, Result] = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {pool.submit(compile_one, b): b for b in builds}
        with tqdm(total=len(builds), desc="triton aot", unit="build", disable=not progress, file=sys.stderr) as bar:
            for future in as_completed(futures):
                result = future.result()
                results[result.build] = result
                bar.set_postfix_str(f"{result.build.target} {result.build.kernel} {result.build.fmt}", refresh=False)
                bar.update()
    return [results[b] for b in builds]


# --- the report -------------------------------------------------------------------------------------------------

def summary(results: Iterable[Result]) -> dict[str, dict[str, int]]:
    """Per target: builds, compiled, failed, declined, pruned (over a format's decode budget, or over the target's
    shared memory), and among the compiled ones: spilling, over shared memory."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        s = out.setdefault(r.build.target, dict(builds=0, compiled=0, failed=0, declined=0, pruned=0, spilling=0,
                                                over_smem=0))
        s["builds"] += 1
        s[r.status] += 1
        # what a GPU runs: the compiled builds the autotuner keeps (pruned ones are counted as pruned)
        s["spilling"] += int(r.spills and r.status == "compiled")
        s["over_smem"] += int(r.over_smem and r.status == "compiled")
    return out


def suggest_budgets(results: Iterable[Result]) -> dict[str, dict[str, int]]:
    """Per matmul kernel and decoder (`triton_args.decoder_name`): the highest per-thread cost
    (`triton_common.thread_cost`) such that no compiled build at or under it spills on any target in `results` (a
    run with `--configs all` and budgets wide open measures them; triton_args.DECODE_BUDGETS is set from it).
    0: even the cheapest config spills."""
    from .triton_args import decoder_name, tile_args

    per: dict[tuple[str, str], dict[int, bool]] = {}
    for r in results:
        if r.build.kernel not in ("tiled", "splitk") or r.status not in ("compiled", "pruned") or r.registers is None:
            continue
        args = tile_args(_packed(r.build.fmt))
        ept = _cost(config_specs(r.build.kernel)[r.build.config])
        spills = per.setdefault((r.build.kernel, decoder_name(args.tile, args.consts[0], args.consts[1])), {})
        spills[ept] = spills.get(ept, False) or r.spills
    out: dict[str, dict[str, int]] = {}
    for (kernel, decoder), by_ept in sorted(per.items()):
        best = 0
        for ept in sorted(by_ept):
            if by_ept[ept]:
                break
            best = ept
        out.setdefault(kernel, {})[decoder] = best
    return out


def _kib(n: int | None) -> str:
    return "" if n is None else f"{n / KIB:.1f}"


def markdown(results: Sequence[Result], command: str, wall_s: float, jobs: int) -> str:
    import triton

    lines = ["# quantserve's Triton kernels built for GPUs, without one", "",
             f"`{command}`: {len(results)} builds in {wall_s:.0f} s wall ({jobs} worker processes), "
             f"triton {triton.__version__}, the wheel's ptxas; generated by `quantserve.kernels.aot`. Builds found in "
             "Triton's cache (TRITON_CACHE_DIR, ~/.triton/cache) take well under a second: the per-build seconds "
             "below are a cold compile only where the cache was empty.", "",
             f"Each build is specialized for a FLUX linear (K = {FLUX_K}, N = {FLUX_N}; M = {TILED_M} tiled, "
             f"M = {SPLITK_M} split-K, split-K partial workspace in float32) as Triton's launcher would specialize "
             "it. Spill: bytes of stack / local memory per thread. Shared: KiB per block, against the target's "
             "opt-in limit. Tensor cores: HMMA (sm_80/sm_89), HGMMA = wgmma (sm_90), UTC*MMA (sm_100).", "",
             "Pruned: a config the autotuner never runs for that format on that target, because its weight tile is "
             "over the format's decode budget (`triton_args.DECODE_BUDGETS`, not compiled) or the build needs more "
             "shared memory than the target gives a block (compiled, figures shown). Spilling and over shared "
             "memory count the shipped builds: compiled and not pruned.", "",
             "## Summary", "", "| target | GPUs | smem limit (KiB) | builds | compiled | failed | declined | pruned "
             "| spilling | over shared memory |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary(results).items():
        t = TARGETS[name]
        lines.append(f"| {name} | {t.gpus} | {t.smem_per_block // KIB} | {s['builds']} | {s['compiled']} | "
                     f"{s['failed']} | {s['declined']} | {s['pruned']} | {s['spilling']} | {s['over_smem']} |")
    spilling = sorted((r for r in results if r.spills and r.status == "compiled"),
                      key=lambda r: -((r.stack or 0) + (r.local or 0)))[:15]
    if spilling:
        lines += ["", "## Worst spills", "", "| target | kernel | format | config | dtype | regs | stack | local |",
                  "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r.build.target} | {r.build.kernel} | {r.build.fmt} | {r.build.config}: {r.config} | "
                  f"{r.build.dtype} | {r.registers} | {r.stack} | {r.local} |" for r in spilling]
    lines += ["", "## Limits", "", "| target | shared memory per block | registers per thread | source |",
              "| --- | ---: | ---: | --- |"]
    lines += [f"| {t.name} | {t.smem_per_block // KIB} KiB | {t.regs_per_thread} | {t.source} |"
              for t in TARGETS.values() if t.name in {r.build.target for r in results}]
    lines += ["", "## Builds", "", "| target | kernel | format | config | dtype | status | regs | stack | local "
              "| shared KiB | tensor-core ops | LDG.E.128 | s | note |",
              "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in results:
        b = r.build
        flags = [f for f, on in (("SPILL", r.spills), ("OVER SMEM", r.over_smem and r.status == "compiled")) if on]
        note = "; ".join(flags + ([r.reason.replace("|", "/")] if r.reason else []))
        tc = f"{r.tensor_core} ({r.tensor_ops})" if r.tensor_ops else ("" if r.tensor_core is None else "0")
        lines.append(f"| {b.target} | {b.kernel} | {b.fmt} | {b.config}: {r.config} | {b.dtype} | {r.status} | "
                     f"{'' if r.registers is None else r.registers} | {'' if r.stack is None else r.stack} | "
                     f"{'' if r.local is None else r.local} | {_kib(r.shared)} | {tc} | "
                     f"{'' if r.ldg128 is None else r.ldg128} | {r.seconds} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantserve.kernels.aot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated, of {', '.join(TARGETS)} (default {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--formats", default="all", help="comma-separated packed format names, or all (default)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    parser.add_argument("--configs", default="all", choices=("all", "ends", "extremes"),
                        help="every autotune config; per kernel and format the first, last, smallest and largest "
                             "tile shipped (ends); or the smallest and largest (extremes) (default all)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="activation dtypes (default bf16,fp16)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--json", action="store_true", help="print every build as a JSON line on stdout")
    parser.add_argument("--out", help="write the Markdown report here (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--suggest-budgets", action="store_true",
                        help="print, per matmul kernel and decoder, the highest per-thread cost that compiles without "
                             "spilling on every target built (for triton_args.DECODE_BUDGETS)")
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [s.strip() for s in text.split(",") if s.strip()]

    formats = list(format_names()) if args.formats == "all" else split(args.formats)
    unknown = sorted(set(formats) - set(format_names()))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)}; accepted: {', '.join(format_names())}")
    try:
        builds = plan(split(args.targets), formats, split(args.kernels), args.configs, split(args.dtypes))
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    results = run(builds, args.jobs, progress=not args.no_progress)
    wall = time.perf_counter() - start
    if args.json:
        for r in results:
            print(json.dumps(r.row()))
    command = "python -m quantserve.kernels.aot " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        from .atomic_write import atomic_write_text

        atomic_write_text(args.out, markdown(results, command.strip(), wall, args.jobs))
    if args.suggest_budgets:
        print(json.dumps(suggest_budgets(results), indent=1))
    for name, s in summary(results).items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in s.items()), file=sys.stderr)
    print(f"{len(results)} builds in {wall:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
