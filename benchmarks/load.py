"""Load benchmark: a FLUX-shaped transformer at real width (hidden 3072, one double and one single block).

For each scheme, in a fresh process: load time, peak RSS, model bytes against bf16, one forward's time against
bf16; side by side with diffusers' own `from_pretrained` for the schemes diffusers runs on a CPU. Run:

    python benchmarks/load.py --schemes bf16,nf4,llm-int8,int8wo,quanto-int8,gguf-q4_k --out benchmarks/load.json

The model is built from a config with seeded random weights (nothing downloaded) and saved once under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

FLUX_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# what diffusers itself can quantize on a CPU, for the side-by-side column
DIFFUSERS_EQUIVALENT = {"int8wo": "torchao-int8wo", "quanto-int8": "quanto-int8", "quanto-int4": "quanto-int4"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(folder: Path) -> Path:
    """Save the FLUX-shaped model in bf16 once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_CONFIG).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder


def _diffusers_config(name: str):
    import diffusers

    if name == "torchao-int8wo":
        from torchao.quantization import Int8WeightOnlyConfig

        return diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    return diffusers.QuantoConfig(weights_dtype=name.split("-")[1])


def _import_backend_libraries() -> None:
    """Import every backend library up front: their import cost is the fixed overhead, not the load's memory."""
    import importlib
    import logging

    logging.disable(logging.WARNING)
    for name in ("bitsandbytes", "torchao.quantization", "optimum.quanto", "gguf", "modelopt.torch.quantization",
                 "quantserve.runtime.loader", "quantserve.runtime.backends.registered"):
        importlib.import_module(name)
    logging.disable(logging.NOTSET)


def worker(model_dir: Path, scheme: str, via: str, forward: bool = True) -> dict:
    """One measurement, in this (fresh) process; `forward=False` measures the load only."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from quantserve.runtime.dummy_inputs import dummy_inputs

    import diffusers  # noqa: F401  (imports counted in the baseline, not the load)

    _import_backend_libraries()
    baseline = peak_rss_mib()
    start = time.perf_counter()
    if via == "quantserve":
        from quantserve.runtime.loader import load_model

        model = load_model(model_dir, None if scheme == "bf16" else scheme)
        report = model.quantserve_report
        model_bytes, bf16_bytes = report.model_bytes, report.bf16_bytes
    else:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16,
                                                       quantization_config=_diffusers_config(scheme))
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mib()
    row = {"scheme": scheme, "via": via, "load_s": load_s, "load_peak_rss_mib": load_peak, "baseline_rss_mib": baseline,
           "model_bytes": model_bytes, "bf16_bytes": bf16_bytes}
    if not forward:
        return {**row, "peak_rss_mib": peak_rss_mib(), "forward_s": None}
    inputs = dummy_inputs(model, dtype=torch.bfloat16)
    with torch.no_grad():
        model(**inputs, return_dict=False)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(**inputs, return_dict=False)
            times.append(time.perf_counter() - t)
    return {**row, "peak_rss_mib": peak_rss_mib(), "forward_s": sorted(times)[1]}


def run_one(model_dir: Path, scheme: str, via: str, timeout_s: float, forward: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model_dir), "--schemes", scheme, "--via", via]
    cmd += [] if forward else ["--no-forward"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"scheme": scheme, "via": via, "error": f"did not finish within {timeout_s:.0f} s on this machine"}
    if proc.returncode != 0:
        return {"scheme": scheme, "via": via, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_layer_bf16_mib(model_dir: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(model_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return max(2 * __import__("math").prod(f.get_slice(k).get_shape()) for k in f.keys()) / 2**20


def table(rows: list[dict], bf16: dict, bound_extra_mib: float) -> str:
    out = ["| scheme | via | load s | load peak RSS MiB (over baseline) | RSS bound MiB | peak RSS incl. forward | "
           "model MiB | vs bf16 | forward s | vs bf16 |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['scheme']} | {r['via']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        over = r["load_peak_rss_mib"] - r["baseline_rss_mib"]
        bound = r["model_bytes"] / 2**20 + bound_extra_mib
        with_forward = r["peak_rss_mib"] - r["baseline_rss_mib"]
        forward = (f"{r['forward_s']:.3f} | {r['forward_s'] / bf16['forward_s']:.2f}x" if r.get("forward_s") is not None
                   else "not run | ")
        out.append(f"| {r['scheme']} | {r['via']} | {r['load_s']:.2f} | {over:.0f} | {bound:.0f} | "
                   f"{f'{with_forward:.0f}' if r.get('forward_s') is not None else '-'} | "
                   f"{r['model_bytes'] / 2**20:.0f} | {r['model_bytes'] / bf16['model_bytes']:.3f}x | {forward} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="bf16,nf4,fp4,llm-int8")
    parser.add_argument("--workdir", default="/tmp/quantserve-bench", help="where the FLUX-shaped model is saved")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--overhead-mib", type=float, default=256.0,
                        help="the fixed overhead allowed in the RSS bound (beyond quantized size + largest bf16 layer)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one scheme may take (default 900)")
    parser.add_argument("--skip-forward", default="float8dq",
                        help="schemes measured for load only (torchao's CPU float8 matmul takes tens of minutes)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-forward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--via", default="quantserve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Path(args.model), args.schemes, args.via, forward=not args.no_forward)))
        return 0
    model_dir = build_model(Path(args.workdir) / "flux-3072")
    schemes = [s for s in args.schemes.split(",") if s]
    no_forward = {s for s in args.skip_forward.split(",") if s}
    rows = []
    for scheme in ["bf16"] + [s for s in schemes if s != "bf16"]:
        for via in ["quantserve"] + (["diffusers"] if scheme in DIFFUSERS_EQUIVALENT else []):
            name = DIFFUSERS_EQUIVALENT.get(scheme, scheme) if via == "diffusers" else scheme
            print(f"measuring {scheme} via {via} ...", file=sys.stderr, flush=True)
            row = run_one(model_dir, name, via, args.timeout, forward=scheme not in no_forward)
            row["scheme"] = scheme
            rows.append(row)
    largest = largest_layer_bf16_mib(model_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"largest layer bf16 {largest:.0f} MiB; RSS bound = model + {largest:.0f} + {args.overhead_mib:.0f} MiB")
    print(table(rows, rows[0], largest + args.overhead_mib))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
