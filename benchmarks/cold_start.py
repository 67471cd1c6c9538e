"""Cold-start benchmark: how long a replica of the FLUX-shaped pipeline takes to be ready, per scheme and per way of
loading it, each measured in a fresh Python process (cold: nothing imported, nothing loaded).

Ways of loading, per scheme (the transformer quantized, text encoders and VAE dense):

  prequantized   quantserve loads a pre-quantized directory (`quantserve quantize` wrote it first)
  on-load        quantserve loads the dense (bf16) directory and quantizes while loading
  diffusers      diffusers' own `FluxPipeline.from_pretrained(..., quantization_config=...)` with the same scheme,
                 where diffusers can on a CPU (its bitsandbytes integration refuses without a GPU: the row says so)
  read           the floor: every file of the pre-quantized directory read once into one reused buffer

Every way then runs one health forward (the transformer on a tiny seeded input, as a replica's health check does;
its first call, so kernels built on first use count). Imports (torch, diffusers, transformers, the pipeline's
classes, quantserve) are timed apart from the load, since a replica pays them whatever it loads.

The goal (issue 18): a pre-quantized replica ready within 1.5x the time to read its bytes plus one health forward:
    ratio = (prequantized load + health) / (read + health)  <= 1.5

Timings are the minimum over --runs fresh processes (the machine may be shared: the minimum is the least disturbed
run). The page cache is warm unless --cold: then each run first drops this benchmark's own files from the page cache
(posix_fadvise DONTNEED on each file; no other file is touched, nothing needs root), so the bytes come from the disk.

    python benchmarks/cold_start.py --preset tiny                       # a quick run (about a minute)
    python benchmarks/cold_start.py --preset flux-real-width --runs 3   # FLUX.1-dev's widths (~2 GB bf16, ~15 min)

Writes a Markdown report (--out, default benchmarks/cold_start.md) with the command, the machine and the tables.
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

WAYS = ("read", "prequantized", "on-load", "diffusers")
# the diffusers quantization config of each scheme, where diffusers has one (None: diffusers cannot on a CPU)
DIFFUSERS_SCHEMES = {"nf4": "bitsandbytes-nf4", "int8wo": "torchao-int8wo", "quanto-int8": "quanto-int8",
                     "quanto-int4": "quanto-int4", "llm-int8": "bitsandbytes-8bit"}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_from_page_cache(folder: Path) -> None:
    """Evict this directory's files (only them) from the page cache, so the next read comes from the disk."""
    for path in _files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- the worker: one measurement in this fresh process --------------------------------------------------------

def _imports(folder: Path) -> None:
    import torch  # noqa: F401
    import diffusers  # noqa: F401

    from quantserve.runtime.pipeline import component_classes, pipeline_class, read_index
    import quantserve.runtime.backends.registered  # noqa: F401  (every backend library, as a replica imports them)

    index = read_index(folder)
    pipeline_class(index, folder)
    component_classes(index, folder)


def _diffusers_config(scheme: str):
    import diffusers
    import torch

    name = DIFFUSERS_SCHEMES[scheme]
    if name.startswith("torchao-"):
        from torchao.quantization import Int8WeightOnlyConfig

        config = diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    elif name.startswith("quanto-"):
        config = diffusers.QuantoConfig(weights_dtype=name.split("-")[1])
    elif name == "bitsandbytes-nf4":
        config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = diffusers.BitsAndBytesConfig(load_in_8bit=True)
    return diffusers.PipelineQuantizationConfig(quant_mapping={"transformer": config})


def _health(transformer) -> float:
    import torch

    from quantserve.runtime.dummy_inputs import dummy_inputs

    inputs = dummy_inputs(transformer, dtype=torch.bfloat16)
    start = time.perf_counter()
    with torch.no_grad():
        out = transformer(**inputs, return_dict=False)[0]
    if not torch.isfinite(out.float()).all():
        raise RuntimeError("the health forward gave non-finite values")
    return time.perf_counter() - start


def worker(way: str, folder: Path, scheme: str, threads: int) -> dict:
    start = time.perf_counter()
    if way == "read":
        buffer = bytearray(64 * 2**20)
        view = memoryview(buffer)
        total = 0
        for path in _files(folder):
            with open(path, "rb", buffering=0) as handle:
                while n := handle.readinto(view):
                    total += n
        return {"read_s": time.perf_counter() - start, "bytes": total, "peak_rss_mib": _rss_mib()}
    import torch

    torch.set_num_threads(threads)
    _imports(folder)
    imports_s = time.perf_counter() - start
    row: dict = {"imports_s": imports_s}
    start = time.perf_counter()
    if way == "diffusers":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16,
                                            quantization_config=_diffusers_config(scheme))
    else:
        from quantserve.runtime import load_pipeline

        pipe = load_pipeline(folder, scheme if way == "on-load" else None, torch_dtype=torch.bfloat16)
        row["phases"] = pipe.quantserve_report.phases
        row["model_bytes"] = pipe.quantserve_report.model_bytes
    row["load_s"] = time.perf_counter() - start
    row["load_peak_rss_mib"] = _rss_mib()
    row["health_s"] = _health(pipe.transformer)
    row["peak_rss_mib"] = _rss_mib()
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        row["rss_anon_mib"] = int(fields.get("RssAnon", "0 kB").split()[0]) / 1024
        row["rss_file_mib"] = int(fields.get("RssFile", "0 kB").split()[0]) / 1024
    return row


def run_worker(way: str, folder: Path, scheme: str, threads: int, timeout_s: float, cold: bool) -> dict:
    if cold:
        drop_from_page_cache(folder)
    cmd = [sys.executable, __file__, "--worker", way, "--folder", str(folder), "--scheme", scheme,
           "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f} s"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:300] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- preparing the directories --------------------------------------------------------------------------------

def prepare(workdir: Path, preset: str, schemes: list[str]) -> tuple[Path, dict[str, Path]]:
    """The bf16 pipeline (built once) and one pre-quantized directory per scheme (`quantserve quantize`, once)."""
    dense = workdir / f"flux-{preset}-bf16"
    if not (dense / "model_index.json").is_file():
        print(f"building the FLUX-shaped pipeline ({preset}, bfloat16) in {dense} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "quantserve.testing.pipelines", "flux", str(dense), "--preset", preset,
                        "--dtype", "bfloat16", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    quantized = {}
    for scheme in schemes:
        out = workdir / f"flux-{preset}-{scheme}"
        if not (out / "model_index.json").is_file():
            print(f"quantserve quantize --scheme {scheme} -> {out} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "quantserve.cli", "quantize", str(dense), "--scheme", scheme,
                            "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        quantized[scheme] = out
    return dense, quantized


# --- the report -----------------------------------------------------------------------------------------------

def best(rows: list[dict], key: str) -> dict:
    """Each figure's minimum over the runs (the least disturbed), phases those of the fastest load; the first
    error when no run succeeded."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[0]
    fastest = dict(min(ok, key=lambda r: r[key]))
    for name, value in fastest.items():
        if name.endswith("_s") and isinstance(value, float):
            fastest[name] = min(r[name] for r in ok)
    return fastest


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(results: dict, args: argparse.Namespace, command: str, notes: list[str]) -> str:
    lines = [f"# Cold start of the FLUX-shaped pipeline ({args.preset})", "",
             f"Command: `{command}`", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU; "
             f"Python {platform.python_version()}; torch threads {args.threads}. "
             f"Page cache: {'dropped for these files before each run (bytes from the disk)' if args.cold else 'warm (the files were just written or read)'}. "
             f"Each time is its own minimum over {args.runs} fresh processes ({args.slow_runs} for on-load and diffusers at "
             f"flux-real-width; the machine is shared, timings are noisy); RSS and phases are the fastest load's.",
             "", "Ready = load + one health forward (the transformer's first forward on a tiny input). "
             "Imports (torch, diffusers, transformers, the pipeline classes, quantserve's backends) are paid by every "
             "way and shown apart. Goal: pre-quantized ready <= 1.5x (read + health).", "",
             "| scheme | way | imports s | load s | health s | ready s | peak RSS MiB (anon / file at end) | "
             "vs read+health |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    phase_rows = []
    for scheme, ways in results.items():
        read = best(ways["read"], "read_s") if ways.get("read") else None
        pre = best(ways["prequantized"], "load_s") if ways.get("prequantized") else None
        health = pre["health_s"] if pre and "error" not in pre else None
        floor = read["read_s"] + health if read and "error" not in read and health is not None else None
        if read is not None and "error" not in read:
            lines.append(f"| {scheme} | read {read['bytes'] / 2**20:.0f} MiB | | {read['read_s']:.2f} | "
                         f"{_fmt(health)} | {_fmt(floor)} | | 1.00x |")
        for way in WAYS[1:]:
            rows = ways.get(way)
            if not rows:
                continue
            r = best(rows, "load_s")
            if "error" in r:
                lines.append(f"| {scheme} | {way} | | failed: {r['error'][:160]} | | | | |")
                continue
            ready = r["load_s"] + r["health_s"]
            ratio = f"{ready / floor:.2f}x" if floor else "-"
            mem = f"{r['peak_rss_mib']:.0f}"
            if "rss_anon_mib" in r:
                mem += f" ({r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f})"
            lines.append(f"| {scheme} | {way} | {r['imports_s']:.2f} | {r['load_s']:.2f} | {r['health_s']:.2f} | "
                         f"{ready:.2f} | {mem} | {ratio} |")
            if "phases" in r:
                phase_rows.append((scheme, way, r["phases"]))
    if phase_rows:
        from quantserve.runtime.phases import LOAD_PHASES

        names = [p for p in LOAD_PHASES if any(p in ph for _, _, ph in phase_rows)]
        lines += ["", "The loads' phases (seconds, the fastest run; `quantserve_cold_start_seconds{phase}` exports the "
                  "same names):", "", "| scheme | way | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in names) + " |"]
        for scheme, way, ph in phase_rows:
            lines.append(f"| {scheme} | {way} | " + " | ".join(_fmt(ph.get(n), 3) for n in names) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "flux-real-width"),
                        help="pipeline size (quantserve.testing.pipelines presets; default: tiny)")
    parser.add_argument("--schemes", default="nf4,int8wo,quanto-int8", help="comma-separated schemes")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per figure; the minimum is kept")
    parser.add_argument("--slow-runs", type=int, default=1,
                        help="runs for the slow ways (on-load, diffusers) at flux-real-width (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--cold", action="store_true", help="drop the directories' files from the page cache "
                        "before each run (posix_fadvise; these files only)")
    parser.add_argument("--workdir", default="/tmp/quantserve-cold-start", help="where the pipelines are written")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--out", default="benchmarks/cold_start.md", help="the Markdown report")
    parser.add_argument("--json", help="also write every run's raw figures as JSON here")
    parser.add_argument("--from-json", help="write the report from a --json file of an earlier run (no runs)")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args.scheme, args.threads)))
        return 0
    from tqdm import tqdm

    schemes = [s for s in args.schemes.split(",") if s]
    ways = [w for w in args.ways.split(",") if w]
    notes = ["diffusers' bitsandbytes integration needs a CUDA GPU: on this CPU-only machine its nf4 row fails "
             "(quantserve drives bitsandbytes itself, CPU included)."] if "nf4" in schemes and "diffusers" in ways else []
    command = "python benchmarks/cold_start.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        text = report(json.loads(Path(args.from_json).read_text()), args, command, notes)
        Path(args.out).write_text(text)
        print(text)
        return 0
    dense, quantized = prepare(Path(args.workdir), args.preset, schemes)
    plan = []
    for scheme in schemes:
        for way in ways:
            if way == "diffusers" and scheme not in DIFFUSERS_SCHEMES:
                continue
            slow = way in ("on-load", "diffusers") and args.preset != "tiny"
            folder = dense if way in ("on-load", "diffusers") else quantized[scheme]
            plan += [(scheme, way, folder)] * (args.slow_runs if slow else args.runs)
    results: dict = {}
    for scheme, way, folder in tqdm(plan, desc="cold starts", unit="process"):
        row = run_worker(way, folder, scheme, args.threads, args.timeout, args.cold)
        results.setdefault(scheme, {}).setdefault(way, []).append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    text = report(results, args, command, notes)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
