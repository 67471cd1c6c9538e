"""CPU kernel benchmark: the router's kernels for every packed format against dense bf16 `F.linear`, on this CPU.

Part 1, linear. For each scheme (its weight made by its own backend from a seeded bf16 weight; GGUF types without
a named scheme from random ggml blocks), each FLUX layer shape N x K (3072x3072, 12288x3072, 3072x12288) and each
M (1, 16, 64, 256): the autotuner's own measurement (`runtime.autotune.tune_layer`: every candidate that can run the
layer, checked against the torch reference, median of 7 after 2 warm-ups) of
- cpu_fused:   quantserve's CPU kernels' own choice by M (`cpu.linear` path "auto"): the fused dequantize-GEMV up to
               4 rows, the fused dequantize-GEMM for bf16 activations up to 64 rows (where AMX or AVX512-BF16 runs),
               slabs above,
- cpu_gemm:    the fused dequantize-GEMM at every M (csrc/qs_gemm.c: a panel of weight rows decoded once into bf16,
               multiplied against every activation row with AMX tiles here; the path it took is in the header),
- cpu_dequant: quantserve's slab dequantize + torch's GEMM,
- native:      the backend's own CPU path,
- reference:   torch dequantize, then F.linear,
and, timed the same way, dense_bf16: `F.linear` on the bf16 weight. The router's choice is the autotuner's winner;
the table gives its time over dense bf16's. The goals (issue 13): <= 1.0 at M = 1; at M = 16 <= 0.6 for 2- to 4-bit
formats and <= 0.8 for 8-bit ones (5- and 6-bit GGUF types have none); <= 1.3 at M = 256.

Part 2, dequantize. Whole (N, K) weights to bf16: quantserve's C dequantizer, the torch reference, bitsandbytes'
CPU `dequantize_4bit` (NF4/FP4) and diffusers' GGUF torch port (`dequantize_gguf_tensor`), in ms and GB/s of bf16
output.

    python benchmarks/kernels_cpu.py --out benchmarks/kernels_cpu.md            # everything (~20 min on 2 cores)
    python benchmarks/kernels_cpu.py --schemes nf4,gguf-q4_k --m 1 --shapes 3072x3072
    python benchmarks/kernels_cpu.py --quick                                     # tiny shapes: proves it runs
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMES = ("nf4", "fp4", "llm-int8", "int8wo", "float8wo", "int4wo", "quanto-int8", "quanto-float8", "quanto-int4",
           "quanto-int2", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-q8_0", "gguf-q2_k", "gguf-q3_k",
           "gguf-q4_k", "gguf-q5_k", "gguf-q6_k", "gguf-iq4_nl", "gguf-iq4_xs", "modelopt-fp8", "modelopt-int8",
           "modelopt-int4", "modelopt-nvfp4")
SHAPES = ((3072, 3072), (12288, 3072), (3072, 12288))
M_VALUES = (1, 16, 64, 256)
QUICK = dict(schemes=("nf4", "int8wo", "gguf-q4_k"), shapes=((64, 256),), m=(1, 20))
CANDIDATES = ("cpu_fused", "cpu_gemm", "cpu_dequant", "native", "reference")
GOALS = {1: 1.0, 256: 1.3}   # every scheme; M = 16 by bits (GOALS_M16)
EIGHT_BIT = ("llm-int8", "int8wo", "float8wo", "quanto-int8", "quanto-float8", "gguf-q8_0", "modelopt-fp8",
             "modelopt-int8")
FIVE_SIX_BIT = ("gguf-q5_0", "gguf-q5_1", "gguf-q5_k", "gguf-q6_k")
GOALS_M16 = {"8-bit": 0.8, "2- to 4-bit": 0.6}


def goal_limit(scheme: str, m: int) -> float | None:
    """The goal for this scheme at M activation rows, or None."""
    if m == 16:
        if scheme in FIVE_SIX_BIT:
            return None
        return GOALS_M16["8-bit" if scheme in EIGHT_BIT else "2- to 4-bit"]
    return GOALS.get(m)
LAYER_NAME = "transformer_blocks.0.attn.to_q"  # a name no backend keeps dense by default
DEQUANT_SCHEMES = ("nf4", "fp4", "int8wo", "int4wo", "quanto-int4", "gguf-q4_0", "gguf-q8_0", "gguf-q4_k",
                   "gguf-q6_k", "gguf-q5_k", "gguf-q3_k", "gguf-q2_k", "modelopt-int4",
                   "modelopt-nvfp4")


@dataclass
class Row:
    scheme: str
    fmt: str
    n: int
    k: int
    m: int
    bf16_ms: float
    timings: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    winner: str = "-"

    @property
    def ratio(self) -> float:
        return self.timings[self.winner] / self.bf16_ms

    @property
    def limit(self) -> float | None:
        return goal_limit(self.scheme, self.m)

    @property
    def goal(self) -> str:
        limit = self.limit
        if limit is None:
            return ""
        return f"<= {limit:.1f}: " + ("met" if self.ratio <= limit else "NOT met")


def time_ms(fn, warmup: int = 2, repeats: int = 7) -> float:
    """Median milliseconds of fn(), as the autotuner times on a CPU."""
    from quantserve.runtime.autotune import time_kernel

    import torch

    return time_kernel(fn, torch.device("cpu"), warmup=warmup, repeats=repeats)


def gguf_random(qtype: str, n: int, k: int, seed: int):
    """A GGUF weight of random blocks whose fp16 scale fields are small finite numbers (timing does not depend on
    the values, and a K-quant quantizer would take minutes per FLUX layer here)."""
    import torch

    from quantserve.kernels.gguf import BLOCK_SIZES
    from quantserve.runtime.backends.gguf import GGUFWeight

    per_block, block_bytes = BLOCK_SIZES[qtype]
    fp16_fields = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                   "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * k // per_block, block_bytes), dtype=torch.uint8, generator=g)
    for offset in fp16_fields[qtype]:
        scale = (torch.rand(raw.shape[0], generator=g) * 1e-3 + 1e-4).half()
        raw[:, offset:offset + 2] = scale.view(torch.uint8).reshape(-1, 2)
    return GGUFWeight(raw.reshape(n, -1), qtype, (n, k))


def build_weight(scheme_name: str, dense):
    """The scheme's backend quantizes the dense bf16 weight as a model load would (GGUF: random blocks)."""
    from quantserve.runtime.backends import backend_for
    from quantserve.runtime.schemes import get_scheme

    if scheme_name.startswith("gguf-"):
        return gguf_random(scheme_name.removeprefix("gguf-").upper(), *dense.shape, seed=dense.shape[0])
    scheme = get_scheme(scheme_name)
    backend = backend_for(scheme.config(), dense.dtype)
    return backend.quantize(LAYER_NAME, dense)


def bench_linear(schemes, shapes, m_values) -> list[Row]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from quantserve.runtime.autotune import tune_layer
    from quantserve.runtime.quant_linear import QuantLinear

    rows: list[Row] = []
    work = [(s, shape) for shape in shapes for s in schemes]
    for scheme, (n, k) in tqdm(work, desc="linear", unit="layer"):
        g = torch.Generator().manual_seed(n + k)
        dense = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        try:
            weight = build_weight(scheme, dense)
        except Exception as exc:  # reported, not fatal
            print(f"{scheme} {n}x{k}: cannot quantize: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        layer = QuantLinear(weight, None, torch.bfloat16)
        w_bf16 = weight.dequantize(torch.bfloat16)
        for m in m_values:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            with torch.no_grad():
                bf16_ms = time_ms(lambda: F.linear(x, w_bf16))
                result = tune_layer(layer, LAYER_NAME, m, torch.device("cpu"))
            row = Row(scheme, weight.fmt, n, k, m, bf16_ms, result.timings_ms, result.rejected, result.winner)
            rows.append(row)
            tqdm.write(f"{scheme} {n}x{k} M={m}: bf16 {bf16_ms:.3f} ms; " +
                       "; ".join(f"{c} {t:.3f}" for c, t in row.timings.items()) +
                       f" -> {row.winner} {row.ratio:.2f}x {row.goal}")
        del weight, layer, w_bf16, dense
    return rows


def bench_dequantize(schemes, shape) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from quantserve.kernels import cpu as cpu_kernels
    from quantserve.kernels import reference

    n, k = shape
    out = []
    for scheme in tqdm(schemes, desc="dequantize", unit="scheme"):
        g = torch.Generator().manual_seed(1)
        dense = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        weight = build_weight(scheme, dense)
        packed = weight.packed()
        row = {"scheme": scheme, "fmt": weight.fmt, "ms": {}}
        buffer = torch.empty(n, k, dtype=torch.bfloat16)
        row["ms"]["quantserve C"] = time_ms(lambda: cpu_kernels.dequantize(packed, torch.bfloat16), repeats=5)
        row["ms"]["quantserve C, out="] = time_ms(lambda: cpu_kernels.dequantize(packed, torch.bfloat16, out=buffer),
                                                  repeats=5)
        row["ms"]["torch reference"] = time_ms(lambda: reference.dequantize(packed, torch.bfloat16), 1, 3)
        if weight.fmt in ("nf4", "fp4"):
            import bitsandbytes.functional as BF

            qs = weight.quant_state()
            row["ms"]["bitsandbytes"] = time_ms(lambda: BF.dequantize_4bit(weight.data, qs), 1, 3)  # (no CPU out=)
        if weight.fmt.startswith("gguf:"):
            from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

            import gguf

            raw = weight.data
            qtype = gguf.GGMLQuantizationType[weight.qtype]

            def diffusers_dequant():
                from diffusers.quantizers.gguf.utils import GGUFParameter

                return dequantize_gguf_tensor(GGUFParameter(raw, quant_type=qtype)).to(torch.bfloat16)

            try:
                row["ms"]["diffusers GGUF"] = time_ms(diffusers_dequant, 1, 3)
            except Exception as exc:
                row["ms"]["diffusers GGUF"] = None
                row["note"] = f"diffusers: {type(exc).__name__}: {str(exc)[:60]}"
        out.append(row)
        tqdm.write(f"{scheme}: " + "; ".join(f"{k2} {v:.2f} ms" for k2, v in row["ms"].items() if v is not None))
        del weight, packed, dense
    return out


def machine() -> str:
    import torch

    from quantserve.kernels import cpu_build

    from quantserve.kernels import cpu

    lib = cpu_build.library()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), quantserve CPU kernels: {lib.qs_isa().decode()}, "
            f"fused GEMM path: {cpu.gemm_path(torch.bfloat16)}")


def markdown(rows: list[Row], dequant: list[dict], shape, command: str) -> str:
    lines = [f"Machine: {machine()}.", f"Command: `{command}`", "",
             "Linear: ms per call (median of 7), and each candidate's time over dense bf16 `F.linear` in the same run; "
             "the router's choice is the autotuner's winner.", "",
             "| scheme | fmt | N x K | M | bf16 ms | " + " | ".join(CANDIDATES) + " | router's choice | choice / bf16 | goal |",
             "|" + "---|" * (7 + len(CANDIDATES))]
    for r in rows:
        cells = []
        for c in CANDIDATES:
            t = r.timings.get(c)
            cells.append(f"{t:.3f} ({t / r.bf16_ms:.2f}x)" if t is not None else
                         ("rejected" if c in r.rejected else "-"))
        lines.append(f"| {r.scheme} | {r.fmt} | {r.n}x{r.k} | {r.m} | {r.bf16_ms:.3f} | " + " | ".join(cells) +
                     f" | {r.winner} | {r.ratio:.2f}x | {r.goal} |")
    met = [r for r in rows if r.limit is not None]
    if met:
        misses = [r for r in met if r.ratio > r.limit]
        lines += ["", f"Goals: {len(met) - len(misses)} of {len(met)} rows met" +
                  ("." if not misses else "; not met: " + ", ".join(f"{r.scheme} {r.n}x{r.k} M={r.m} ({r.ratio:.2f}x)"
                                                                    for r in misses))]
    if dequant:
        impls = ["quantserve C", "quantserve C, out=", "torch reference", "bitsandbytes", "diffusers GGUF"]
        n, k = shape
        lines += ["", f"Dequantize a {n}x{k} weight to bf16: ms (GB/s of bf16 output). A new tensor each call, or "
                      "`out=` a reused buffer (a fresh 75 MB tensor costs its page faults, more than the decoding; "
                      "bitsandbytes has no CPU `out=`); speed-ups of the C kernel (new tensor) over each other path.", "",
                  "| scheme | fmt | " + " | ".join(impls) + " | C vs reference | C vs bitsandbytes | C vs diffusers |",
                  "|" + "---|" * (2 + len(impls) + 3)]
        for d in dequant:
            ms = d["ms"]
            cells = [f"{ms[i]:.2f} ({2 * n * k / (ms[i] * 1e-3) / 1e9:.1f})" if ms.get(i) else "-" for i in impls]
            c = ms["quantserve C"]
            speed = [f"{ms['torch reference'] / c:.1f}x",
                     f"{ms['bitsandbytes'] / c:.1f}x" if ms.get("bitsandbytes") else "-",
                     f"{ms['diffusers GGUF'] / c:.1f}x" if ms.get("diffusers GGUF") else "-"]
            lines.append(f"| {d['scheme']} | {d['fmt']} | " + " | ".join(cells) + " | " + " | ".join(speed) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme names")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,NxK,...")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated activation rows")
    parser.add_argument("--dequant-schemes", default=",".join(DEQUANT_SCHEMES),
                        help="schemes of the dequantize table ('' skips it)")
    parser.add_argument("--dequant-shape", default="3072x12288", help="NxK of the dequantize table")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, three schemes: proves the script runs")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown tables here (atomically)")
    args = parser.parse_args(argv)
    if args.quick:
        args.schemes = ",".join(QUICK["schemes"])
        args.shapes = ",".join(f"{n}x{k}" for n, k in QUICK["shapes"])
        args.m = ",".join(map(str, QUICK["m"]))
        args.dequant_schemes = "nf4,gguf-q4_k"
        args.dequant_shape = "64x256"
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    args.m = [int(v) for v in args.m.split(",") if v]
    args.dequant_schemes = [s for s in args.dequant_schemes.split(",") if s]
    args.dequant_shape = tuple(int(v) for v in args.dequant_shape.lower().split("x"))
    from quantserve.runtime.schemes import get_scheme

    for s in args.schemes + args.dequant_schemes:
        if not s.startswith("gguf-"):
            get_scheme(s)  # an unknown name fails here, with the accepted names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    rows = bench_linear(args.schemes, args.shapes, args.m)
    dequant = bench_dequantize(args.dequant_schemes, args.dequant_shape) if args.dequant_schemes else []
    command = "python benchmarks/kernels_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, dequant, args.dequant_shape, command.strip())
    print(table)
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if args.out is not None:
        from quantserve.kernels.atomic_write import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
