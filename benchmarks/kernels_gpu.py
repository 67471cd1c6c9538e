"""Kernel benchmark: quantserve's Triton kernels against each backend's own kernel and dense bf16 cuBLAS.

For each scheme (a packed format made by its own backend) and each FLUX-like linear shape (N x K = 3072x3072,
12288x3072) and M in {1, 16, 256, 4096}, time in bf16:
- triton_fused:   Triton fused dequantize-matmul (split-K for M <= 16, tiled above);
- triton_dequant: Triton dequantizes the weight to bf16, cuBLAS multiplies;
- native:         the backend's own kernel (QuantizedWeight.linear);
- dense_bf16:     cuBLAS on the bf16 weight.
Each is checked against the torch reference before it is timed (relative error in the table; a kernel that strays
is marked and not timed). Timing: triton.testing.do_bench (CUDA events, L2 flushed before every run, warm-up first,
the median of the repeats). The table gives milliseconds, TFLOP/s (2*M*N*K) and effective weight GB/s (the packed
weight's bytes over the time; for dense_bf16 the bf16 weight's), and the floor: the larger of 2*M*N*K over the
measured bf16 matmul rate and the fewest bytes (packed weight, x and y once) over the measured copy bandwidth, both
ceilings measured on the device first (a large device-to-device copy, a large bf16 matmul).

    python benchmarks/kernels_gpu.py --out benchmarks/kernels.md                        # an H100: every scheme
    python benchmarks/kernels_gpu.py --schemes nf4,gguf-q4_k --m 1,16 --out nf4.md       # a subset
    python benchmarks/kernels_gpu.py --smoke                                              # a CPU, Triton's interpreter

The first run on a machine compiles and autotunes every kernel variant (a minute or more per scheme); Triton keeps
the binaries in its cache (~/.triton/cache), so later runs on the same machine start fast. `--smoke` runs tiny
shapes on the CPU through TRITON_INTERPRET=1 (timings there mean nothing; it proves the script runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMES = ("nf4", "fp4", "llm-int8", "int8wo", "float8wo", "int4wo", "quanto-int8", "quanto-float8", "quanto-int4",
           "gguf-q4_0", "gguf-q8_0", "gguf-q4_k", "gguf-q6_k", "modelopt-nvfp4")
SHAPES = ((3072, 3072), (12288, 3072))
M_VALUES = (1, 16, 256, 4096)
SMOKE_SCHEMES = ("nf4", "llm-int8", "gguf-q4_k")
SMOKE_SHAPES = ((48, 256),)
SMOKE_M = (1, 20)
IMPLS = ("triton_fused", "triton_dequant", "native", "dense_bf16")
LAYER_NAME = "transformer_blocks.0.attn.to_q"  # a name no backend keeps dense by default


@dataclass
class Ceilings:
    """What this device does at best: bytes/s of a large copy (read + write), and flop/s of a large bf16 matmul."""

    bandwidth: float | None = None
    flops: float | None = None

    def floor_ms(self, row: "Row") -> float | None:
        if self.bandwidth is None or self.flops is None or not row.weight_bytes:
            return None
        moved = row.weight_bytes + 2 * row.m * (row.k + row.n)  # packed weight, bf16 x and y, each once
        return 1e3 * max(2.0 * row.m * row.n * row.k / self.flops, moved / self.bandwidth)


def measure_ceilings(device, timer) -> Ceilings:
    import torch

    if device.type != "cuda":
        return Ceilings()
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (timer(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, device=device).to(torch.bfloat16)
    flops = 2 * 8192**3 / (timer(lambda: a @ a) * 1e-3)
    del a
    torch.cuda.empty_cache()
    return Ceilings(bandwidth, flops)


@dataclass
class Row:
    scheme: str
    fmt: str
    n: int
    k: int
    m: int
    weight_bytes: int
    ms: dict[str, float | None] = field(default_factory=dict)
    error: dict[str, float | None] = field(default_factory=dict)
    note: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme names")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,NxK,...")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated M values")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time per measurement (ms)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the kernels
        if args.schemes == parser.get_default("schemes"):
            args.schemes = ",".join(SMOKE_SCHEMES)
        if args.shapes == parser.get_default("shapes"):
            args.shapes = ",".join(f"{n}x{k}" for n, k in SMOKE_SHAPES)
        if args.m == parser.get_default("m"):
            args.m = ",".join(map(str, SMOKE_M))
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    args.m = [int(v) for v in args.m.split(",") if v]
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; accepted: {', '.join(IMPLS)}")
    return args


def make_timer(device, rep_ms: float):
    """Median milliseconds of fn(): do_bench on a GPU (events, L2 flushed per run); perf_counter on a CPU."""
    if device.type == "cuda":
        import triton.testing

        def timer(fn) -> float:
            return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))

        return timer

    def cpu_timer(fn) -> float:
        fn()
        samples = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)

    return cpu_timer


def build_weight(scheme_name: str, dense):
    """The scheme's backend quantizes the dense (N, K) bf16 weight, as a model load would."""
    from quantserve.runtime.backends import backend_for
    from quantserve.runtime.schemes import get_scheme

    scheme = get_scheme(scheme_name)
    options = {"gguf_type": scheme.gguf_type} if scheme.gguf_type else {}
    backend = backend_for(scheme.config(), dense.dtype, **options)
    return backend.quantize(LAYER_NAME, dense)


def relative_error(got, expected) -> float:
    got, expected = got.double(), expected.double()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def bench_scheme(scheme: str, shapes, m_values, impls, timer, device) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from quantserve.runtime import kernel_candidates as kc
    from quantserve.runtime.quant_linear import reference_kernel

    rows: list[Row] = []
    for n, k in shapes:
        gen = torch.Generator(device=device).manual_seed(n + k)
        dense = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        try:
            weight = build_weight(scheme, dense)
        except Exception as exc:  # a scheme this machine cannot make is reported, not fatal
            rows.append(Row(scheme, "-", n, k, 0, 0, note={"all": f"cannot quantize: {type(exc).__name__}: {exc}"}))
            continue
        w_ref = weight.dequantize(torch.bfloat16)  # dense_bf16 runs on the dequantized weight: same numbers
        kernels = {
            "triton_fused": lambda x: kc.triton_fused_kernel(x, weight, None),
            "triton_dequant": lambda x: kc.triton_dequant_kernel(x, weight, None),
            "native": lambda x: weight.linear(x, None),
            "dense_bf16": lambda x: F.linear(x, w_ref),
        }
        packed_ok, packed_why = True, ""
        try:
            weight.packed()
        except Exception as exc:
            packed_ok, packed_why = False, f"{type(exc).__name__}: {exc}"
        for m in m_values:
            row = Row(scheme, weight.fmt, n, k, m, weight.nbytes)
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            with torch.no_grad():
                expected = reference_kernel(x, weight, None)
                for impl in impls:
                    if impl.startswith("triton") and not packed_ok:
                        row.ms[impl], row.note[impl] = None, packed_why
                        continue
                    fn = kernels[impl]
                    try:
                        got = fn(x)
                        row.error[impl] = relative_error(got, expected)
                        if not row.error[impl] <= 3e-2:
                            row.ms[impl], row.note[impl] = None, "strays from the reference"
                            continue
                        row.ms[impl] = timer(lambda fn=fn: fn(x))
                    except Exception as exc:
                        row.ms[impl], row.note[impl] = None, f"{type(exc).__name__}: {str(exc)[:80]}"
            rows.append(row)
            print(format_row(row), flush=True)
        del weight, dense, w_ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cell(row: Row, impl: str) -> str:
    ms = row.ms.get(impl)
    if ms is None:
        return row.note.get(impl, row.note.get("all", "-"))
    tflops = 2.0 * row.m * row.n * row.k / (ms * 1e-3) / 1e12
    weight_bytes = 2 * row.n * row.k if impl == "dense_bf16" else row.weight_bytes
    gbps = weight_bytes / (ms * 1e-3) / 1e9
    return f"{ms:.4f} ms / {tflops:.1f} TF / {gbps:.0f} GB/s"


def format_row(row: Row) -> str:
    return f"{row.scheme} {row.n}x{row.k} M={row.m}: " + "; ".join(f"{i} {_cell(row, i)}" for i in IMPLS if i in row.ms)


def markdown(rows: list[Row], impls, device_name: str, ceilings: Ceilings) -> str:
    head = ["scheme", "fmt", "N x K", "M", "bits/w", "floor ms", *impls, "fused / floor", "fused rel. err"]
    measured = ("not measured" if ceilings.bandwidth is None else
                f"copy {ceilings.bandwidth / 1e9:.0f} GB/s, bf16 matmul {ceilings.flops / 1e12:.0f} TFLOP/s")
    lines = [f"Device: {device_name}; measured ceilings: {measured}.",
             "Cells: median ms / TFLOP/s (2MNK) / effective weight GB/s (packed bytes; bf16 bytes for dense_bf16).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bits = f"{8 * r.weight_bytes / (r.n * r.k):.2f}" if r.weight_bytes else "-"
        err = r.error.get("triton_fused")
        floor = ceilings.floor_ms(r)
        fused = r.ms.get("triton_fused")
        ratio = f"{fused / floor:.1f}x" if floor and fused else "-"
        lines.append("| " + " | ".join([r.scheme, r.fmt, f"{r.n} x {r.k}", str(r.m), bits,
                                        "-" if floor is None else f"{floor:.4f}",
                                        *(_cell(r, i) for i in impls), ratio,
                                        "-" if err is None else f"{err:.1e}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke (Triton's interpreter, tiny shapes) or on a GPU", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, --smoke)"
    timer = make_timer(device, args.rep_ms)
    ceilings = measure_ceilings(device, timer)
    rows: list[Row] = []
    for scheme in args.schemes:
        rows += bench_scheme(scheme, args.shapes, args.m, args.impls, timer, device)
    table = markdown(rows, args.impls, device_name, ceilings)
    print(table)
    if args.out is not None:
        from quantserve.kernels.atomic_write import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, table)
    failed = [r for r in rows for i in args.impls
              if i.startswith("triton") and r.note.get(i) == "strays from the reference"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
