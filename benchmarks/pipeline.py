"""Pipeline benchmark: a FLUX-shaped text-to-image pipeline at real width, end to end on the CPU (issue 11).

The pipeline is built locally with seeded random weights (nothing is downloaded): FluxPipeline with a
FluxTransformer2DModel at hidden 3072 (24 heads x 128) with one double and one single block, T5 v1.1 XXL's widths
(d_model 4096, d_ff 10240) at two layers, CLIP-L's width at two layers and FLUX's VAE in full
(`quantserve.testing.build_pipeline("flux", ..., preset="flux-real-width")`), written once in bfloat16 to
$QUANTSERVE_CACHE_DIR/bench/flux-real-width (default ~/.cache/quantserve/bench/...) and reused after.

Each scheme quantizes the transformer AND the T5 text encoder (text_encoder_2). CLIP (text_encoder, 29 MiB) and
the VAE (convolutions) stay bf16 in every row, for quantserve and diffusers alike. Every row runs in a fresh Python
process, so that its peak RSS is its own:

  1. import torch, diffusers, transformers, every backend library and quantserve's loader; the RSS baseline is
     taken here, after the imports;
  2. load the pipeline: quantserve's `load_pipeline(path, {"transformer": S, "text_encoder_2": S})`, or diffusers'
     own `DiffusionPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(...))` with the
     same scheme where diffusers has one (quanto int8/int4, torchao int8wo; its bitsandbytes loader and torchao
     int4wo are tried too and fail on a CPU, which the table says); load seconds and peak RSS of the load
     (Linux VmHWM, reset after the imports; psutil polling elsewhere);
  3. generate one image per call, end to end (prompt encoding, denoising, VAE decode, PIL image), fixed prompt and
     seed, one warm-up call, then the median of --repeats calls; the peak RSS is reset after the load, so the
     generation peak is measured on its own.

Bytes per component come from quantserve's load report (`pipe.quantserve_report`) or, for diffusers, from the
loaded tensors (quanto's and torchao's tensor subclasses counted by their packed inner tensors). The RSS bound is
the row's whole pipeline bytes + the largest layer of the directory in bf16 + 256 MiB.

Goals checked and printed: every scheme's quantserve latency no higher than diffusers' with the same scheme;
nf4 bytes of transformer + T5 <= 0.30x their bf16 bytes; quantserve's peak RSS over baseline during load and
during generation within the bound.

Run (the default is the issue's 256x256, 4 steps, FLUX's max_sequence_length of 512; 10-15 minutes on an idle
2-core machine, 13 rows of which 3 are diffusers' failures):

    python benchmarks/pipeline.py --out benchmarks/pipeline.md
    python benchmarks/pipeline.py --schemes bf16,nf4 --repeats 1          # a subset
    python benchmarks/pipeline.py --preset tiny --size 64 --steps 1        # the tiny pipeline, seconds
    python benchmarks/pipeline.py --model DIR                              # any FLUX pipeline directory
    python benchmarks/pipeline.py --json > run.json                        # rows as JSON, markdown to --out
    python benchmarks/pipeline.py --schemes nf4 --merge run.json           # re-run rows a busy machine disturbed
    python benchmarks/pipeline.py --from-json run.json                     # the report again, measuring nothing

On a shared machine, --wait-idle 1.5 starts each row only once the 1-minute load average is below 1.5; the
"CPU s" column (the process's CPU seconds per call) and the load average after each row tell a disturbed row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
DEFAULT_SCHEMES = "bf16,nf4,int8wo,int4wo,quanto-int8,quanto-int4,gguf-q8_0"
QUANTIZED = ("transformer", "text_encoder_2")  # what every scheme quantizes
COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")
PRESETS = {"flux-real-width": "FLUX-shaped at real width", "tiny": "tiny FLUX (tests)"}
PROMPT = "a photo of a red fox sitting in a snowy field, golden hour, highly detailed"
NF4_GOAL = 0.30
OVERHEAD_MIB = 256.0
MIB = 2**20
ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")
COMPARABLE = ("size", "steps", "max_sequence_length", "repeats", "threads", "seed", "preset", "model")

# scheme -> how diffusers' own pipeline quantizes it (transformer: diffusers' config; T5: transformers' config).
# bitsandbytes and torchao int4wo are listed so that a run shows what diffusers does with them on this machine.
DIFFUSERS_SCHEMES = {
    "bf16": "none (bf16)",
    "int8wo": "TorchAoConfig(Int8WeightOnlyConfig())",
    "int4wo": "TorchAoConfig(Int4WeightOnlyConfig())",
    "quanto-int8": "QuantoConfig(weights_dtype='int8') / transformers QuantoConfig(weights='int8')",
    "quanto-int4": "QuantoConfig(weights_dtype='int4') / transformers QuantoConfig(weights='int4')",
    "nf4": "PipelineQuantizationConfig(quant_backend='bitsandbytes_4bit', nf4, bf16 compute)",
    "fp4": "PipelineQuantizationConfig(quant_backend='bitsandbytes_4bit', fp4, bf16 compute)",
    "llm-int8": "PipelineQuantizationConfig(quant_backend='bitsandbytes_8bit')",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Memory: peak RSS of this process, resettable


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    import psutil

    return psutil.Process().memory_info().rss / MIB


class PeakMeter:
    """The peak RSS since the last reset: Linux's VmHWM (reset through /proc/self/clear_refs), else psutil polling
    every 2 ms in a thread."""

    def __init__(self) -> None:
        self.method = "VmHWM" if self._try_clear() and _status_kib("VmHWM") is not None else "psutil polling"
        self._peak = 0.0
        self._stop = threading.Event()
        if self.method != "VmHWM":
            threading.Thread(target=self._poll, daemon=True).start()

    @staticmethod
    def _try_clear() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
            return True
        except OSError:
            return False

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, current_rss_mib())

    def reset(self) -> None:
        if self.method == "VmHWM":
            self._try_clear()
        else:
            self._peak = current_rss_mib()

    def peak_mib(self) -> float:
        if self.method == "VmHWM":
            return _status_kib("VmHWM") / 1024
        return max(self._peak, current_rss_mib())

    def segment(self) -> float:
        """The peak since the last reset, then reset: consecutive segments' peaks, whose max is the whole peak."""
        peak = self.peak_mib()
        self.reset()
        return peak


# --------------------------------------------------------------------------------------------------------------
# Byte counting for diffusers' pipelines (quantserve's come from its load report)


def tensor_bytes(t: Any) -> int:
    """Bytes a tensor holds; a tensor subclass (quanto's, torchao's) by the inner tensors it flattens to."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t).__name__ not in ("Parameter", "Tensor"):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def module_bytes(module: Any) -> tuple[int, int]:
    """(bytes held, bytes in bf16) of a module's parameters and buffers, each tensor once."""
    held = bf16 = 0
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        held += tensor_bytes(t)
        bf16 += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return held, bf16


# --------------------------------------------------------------------------------------------------------------
# The worker: one row, in a fresh process


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torchao", "torch.utils._pytree", "diffusers", "transformers", "bitsandbytes", "optimum.quanto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _import_everything() -> None:
    """Every library either loader may touch, imported before the baseline: imports are fixed overhead."""
    import importlib

    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import FluxPipeline  # noqa: F401  (diffusers imports pipelines lazily)
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    for name in ("bitsandbytes", "torchao.quantization", "optimum.quanto", "gguf", "quantserve.runtime",
                 "quantserve.runtime.loader", "quantserve.runtime.backends.registered"):
        try:
            importlib.import_module(name)
        except ImportError:  # a missing backend shows up as that row's load error
            pass
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()  # its warnings stay: a failed conversion's report names the cause (parent reads it)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def diffusers_config(scheme: str) -> Any:
    """diffusers' PipelineQuantizationConfig for a scheme, on the transformer and T5, or None for bf16."""
    import diffusers
    import torch
    import transformers

    if scheme == "bf16":
        return None
    if scheme in ("nf4", "fp4"):
        return diffusers.PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", components_to_quantize=list(QUANTIZED),
            quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": scheme,
                          "bnb_4bit_compute_dtype": torch.bfloat16})
    if scheme == "llm-int8":
        return diffusers.PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit",
                                                    quant_kwargs={"load_in_8bit": True},
                                                    components_to_quantize=list(QUANTIZED))
    if scheme in ("int8wo", "int4wo"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        ao = Int8WeightOnlyConfig() if scheme == "int8wo" else Int4WeightOnlyConfig()
        return diffusers.PipelineQuantizationConfig(quant_mapping={
            "transformer": diffusers.TorchAoConfig(ao), "text_encoder_2": transformers.TorchAoConfig(ao)})
    if scheme in ("quanto-int8", "quanto-int4"):
        weights = scheme.split("-")[1]
        return diffusers.PipelineQuantizationConfig(quant_mapping={
            "transformer": diffusers.QuantoConfig(weights_dtype=weights),
            "text_encoder_2": transformers.QuantoConfig(weights=weights)})
    raise ValueError(f"diffusers has no CPU equivalent of scheme {scheme!r} in this benchmark")


class StageTimer:
    """Seconds per stage of one pipeline call (text encoders, transformer over all steps, VAE decode) and the peak
    RSS within each stage (`other`: between stages), from consecutive segments of the peak meter."""

    def __init__(self, pipe: Any, meter: PeakMeter) -> None:
        self.seconds: dict[str, float] = {}
        self.meter = meter
        self.peaks: dict[str, float] = {}
        for name in ("text_encoder", "text_encoder_2", "transformer"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.register_forward_pre_hook(self._pre(name))
                module.register_forward_hook(self._post(name))
        decode = pipe.vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            self.mark("other")
            start = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                self.seconds["vae"] = self.seconds.get("vae", 0.0) + time.perf_counter() - start
                self.mark("vae")

        pipe.vae.decode = timed_decode
        self._start: dict[str, float] = {}

    def mark(self, segment: str) -> None:
        """The segment that ends now was `segment`: fold its peak RSS in."""
        self.peaks[segment] = max(self.peaks.get(segment, 0.0), self.meter.segment())

    def _pre(self, name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            self.mark("other")
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._start.pop(name)
            self.mark(name)
        return hook


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load one pipeline and time its generation, in this fresh process; returns the row."""
    _quiet()
    import torch

    torch.set_num_threads(args.threads)
    _import_everything()
    import gc

    from quantserve.runtime.memory import release_freed_memory

    scheme, via = args.schemes, args.via
    meter = PeakMeter()
    gc.collect()
    release_freed_memory()
    baseline = current_rss_mib()
    meter.reset()
    log(f"[pipeline]   {scheme} via {via}: loading (RSS baseline after imports {baseline:.0f} MiB)")
    start = time.perf_counter()
    if via == "quantserve":
        from quantserve.runtime import load_pipeline

        pipe = load_pipeline(args.model, None if scheme == "bf16" else dict.fromkeys(QUANTIZED, scheme))
        report = pipe.quantserve_report
        components = {name: {"bytes": r.model_bytes, "bf16_bytes": r.bf16_bytes}
                      for name, r in report.components.items()}
        kernels = report.kernels()
    else:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16,
                                                           quantization_config=diffusers_config(scheme))
        components = {}
        for name in COMPONENTS:
            module = getattr(pipe, name, None)
            if module is not None:
                held, bf16 = module_bytes(module)
                components[name] = {"bytes": held, "bf16_bytes": bf16}
        kernels = {}
    load_s = time.perf_counter() - start
    load_peak = meter.peak_mib()
    log(f"[pipeline]   {scheme} via {via}: loaded in {load_s:.1f} s, peak {load_peak - baseline:.0f} MiB over baseline")
    pipe.set_progress_bar_config(disable=True)
    stages = StageTimer(pipe, meter)
    gc.collect()
    release_freed_memory()
    after_load = current_rss_mib()
    meter.reset()
    latencies: list[float] = []
    cpu_seconds: list[float] = []
    stage_runs: list[dict[str, float]] = []
    image = None
    # no inference_mode: the pipeline call runs under its own torch.no_grad(), as a user's call does (quanto's
    # int4 CPU path fails inside inference_mode)
    for i in range(args.repeats + 1):  # the first call is the warm-up
        stages.seconds = {}
        cpu = os.times()
        start = time.perf_counter()
        image = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                     max_sequence_length=args.max_sequence_length,
                     generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
        seconds = time.perf_counter() - start
        cpu_used = sum(os.times()[:2]) - sum(cpu[:2])
        stages.mark("other")
        log(f"[pipeline]   {scheme} via {via}: {'warm-up' if i == 0 else f'call {i}/{args.repeats}'} "
            f"{seconds:.2f} s ({cpu_used:.1f} s CPU)")
        if i:
            latencies.append(seconds)
            cpu_seconds.append(cpu_used)
            stage_runs.append(dict(stages.seconds))
    gen_peak = max(stages.peaks.values())
    if args.image_out:
        import numpy as np

        np.save(args.image_out, np.asarray(image.convert("RGB"), dtype=np.uint8))
    median_run = stage_runs[latencies.index(sorted(latencies)[(len(latencies) - 1) // 2])]
    return {
        "scheme": scheme, "via": via, "baseline_rss_mib": baseline, "load_s": load_s,
        "load_peak_over_baseline_mib": load_peak - baseline, "rss_after_load_over_baseline_mib": after_load - baseline,
        "gen_peak_over_baseline_mib": gen_peak - baseline,
        "latency_s": statistics.median(latencies), "latencies_s": latencies, "stages_s": median_run,
        "cpu_s": statistics.median(cpu_seconds), "cpu_s_calls": cpu_seconds,
        "stage_peak_over_baseline_mib": {k: v - baseline for k, v in stages.peaks.items()},
        "components": components, "kernels": kernels, "peak_method": meter.method,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------
# The parent: one fresh process per row


def run_row(args: argparse.Namespace, model_dir: Path, scheme: str, via: str, image_out: Path) -> dict[str, Any]:
    """Run one row in a fresh process; its own figures, plus the process's whole peak RSS from wait4."""
    cmd = [sys.executable, str(SCRIPT), "--worker", "--model", str(model_dir), "--schemes", scheme, "--via", via,
           "--size", str(args.size), "--steps", str(args.steps), "--max-sequence-length", str(args.max_sequence_length),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed),
           "--image-out", str(image_out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []  # every "SomeError: message" line, for the cause of a wrapped error

    def read_err() -> None:
        for line in proc.stderr:
            if line.startswith("[pipeline]"):
                if not args.quiet:
                    log(line.rstrip())
            elif line.strip():
                tail.append(line.rstrip())
                if ERROR_LINE.match(line) and line.rstrip() not in errors:
                    errors.append(line.rstrip())

    readers = [threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for reader in readers:
        reader.start()
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    start = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join(timeout=10)
    wall = time.perf_counter() - start
    row: dict[str, Any] = {"scheme": scheme, "via": via, "process_wall_s": wall,
                           "process_peak_rss_mib": usage.ru_maxrss / 1024}
    if proc.returncode != 0:
        if wall >= args.timeout:
            row["error"] = f"did not finish within {args.timeout:.0f} s"
        else:
            # the last error, and the first if it differs (transformers wraps a conversion's cause in its own)
            message = errors[-1] if errors else (tail[-1] if tail else f"exit {proc.returncode}")
            if len(errors) > 1 and errors[0] != errors[-1]:
                message += f" (cause: {errors[0]})"
            row["error"] = message
        return row
    return {**row, **json.loads("".join(out).strip().splitlines()[-1])}


def wait_for_idle(threshold: float, max_wait_s: float) -> None:
    """Wait (at most max_wait_s) until the 1-minute load average falls below threshold: a shared machine's other
    jobs disturb every figure."""
    deadline = time.monotonic() + max_wait_s
    if os.getloadavg()[0] >= threshold:
        log(f"[pipeline] waiting for the 1-min load average ({os.getloadavg()[0]:.2f}) to fall below {threshold} ...")
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)


def ensure_pipeline(args: argparse.Namespace) -> Path:
    """--model as given, else the preset built once into the cache directory."""
    if args.model:
        path = Path(args.model)
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"error: --model {path}: not a diffusers pipeline directory (no model_index.json)")
        return path
    from quantserve.runtime.autotune import cache_dir

    path = Path(args.cache_dir) if args.cache_dir else cache_dir() / "bench"
    path = path / args.preset
    if not (path / "model_index.json").is_file():
        import torch

        from quantserve.testing import build_pipeline

        log(f"[pipeline] building the {args.preset} FLUX pipeline (bf16, seed 0) into {path} (once) ...")
        start = time.perf_counter()
        try:
            build_pipeline("flux", path, preset=args.preset, seed=0, dtype=torch.bfloat16, overwrite=path.exists())
        except FileExistsError:  # another run built it meanwhile
            pass
        log(f"[pipeline] built in {time.perf_counter() - start:.0f} s")
    return path


def largest_layer_bf16_mib(model_dir: Path) -> tuple[float, str]:
    """The largest weight tensor of every component's safetensors files, in bf16 MiB, and its name."""
    import math

    from safetensors import safe_open

    best, where = 0, ""
    for file in sorted(model_dir.glob("*/*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                size = 2 * math.prod(handle.get_slice(key).get_shape())
                if size > best:
                    best, where = size, f"{file.parent.name}.{key}"
    return best / MIB, where


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"^Model name:\s+(.+)$", lscpu, re.M).group(1).strip()
    except (OSError, AttributeError, subprocess.SubprocessError):
        pass
    ram = None
    try:
        ram = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1)) / 2**20
    except (OSError, AttributeError):
        pass
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": ram, "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes")}


def pair_bytes(row: dict[str, Any]) -> tuple[int, int]:
    """(bytes, bf16 bytes) of the quantized components together: transformer + T5."""
    comps = row["components"]
    return (sum(comps[c]["bytes"] for c in QUANTIZED if c in comps),
            sum(comps[c]["bf16_bytes"] for c in QUANTIZED if c in comps))


def add_derived(rows: list[dict[str, Any]], largest_mib: float) -> None:
    """Bounds, ratios and image differences, in place."""
    import numpy as np

    by_key = {(r["scheme"], r["via"]): r for r in rows}
    reference = by_key.get(("bf16", "diffusers")) or by_key.get(("bf16", "quantserve"))
    ref_image = (np.load(reference["image"]).astype(np.float32)
                 if reference and "error" not in reference and Path(reference["image"]).is_file() else None)
    for row in rows:
        if "error" in row:
            continue
        total = sum(c["bytes"] for c in row["components"].values())
        row["pipeline_bytes"] = total
        row["pipeline_bf16_bytes"] = sum(c["bf16_bytes"] for c in row["components"].values())
        row["rss_bound_mib"] = total / MIB + largest_mib + OVERHEAD_MIB
        held, bf16 = pair_bytes(row)
        row["quantized_ratio"] = held / bf16 if bf16 else None
        other = by_key.get((row["scheme"], "diffusers" if row["via"] == "quantserve" else "quantserve"))
        if row["via"] == "quantserve" and other and "error" not in other:
            row["latency_vs_diffusers"] = row["latency_s"] / other["latency_s"]
        if ref_image is not None and Path(row["image"]).is_file():
            image = np.load(row["image"]).astype(np.float32)
            row["image_diff_vs_ref"] = float(np.abs(image - ref_image).mean() / 255)
        row["image_ref"] = f"bf16 via {reference['via']}" if reference else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_mib(n_bytes: float) -> str:
    """MiB with as many decimals as small sizes (the tiny pipeline's) need."""
    mib = n_bytes / MIB
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 10 else f"{mib:.2f}"


def via_label(row: dict[str, Any]) -> str:
    return f"{row['via']} (re-run)" if row.get("rerun") else row["via"]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scheme | via | load s | load peak MiB | gen peak MiB | RSS bound MiB | latency s | vs diffusers | "
            "transformer MiB | T5 MiB | CLIP MiB | VAE MiB | pipeline MiB | transformer+T5 vs bf16 | image diff |")
    out = [head, "| --- | --- |" + " ---: |" * 13]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['scheme']} | {via_label(r)} | failed: {r['error'][:300].replace('|', '/')} |" + " |" * 12)
            continue
        comps = r["components"]

        def mib(name: str) -> str:
            return fmt_mib(comps[name]["bytes"]) if name in comps else "-"

        out.append(
            f"| {r['scheme']} | {via_label(r)} | {r['load_s']:.2f} | {r['load_peak_over_baseline_mib']:.0f} | "
            f"{r['gen_peak_over_baseline_mib']:.0f} | {r['rss_bound_mib']:.0f} | {r['latency_s']:.2f} | "
            f"{fmt(r.get('latency_vs_diffusers'), '.2f')}{'x' if r.get('latency_vs_diffusers') else ''} | "
            f"{mib('transformer')} | {mib('text_encoder_2')} | {mib('text_encoder')} | {mib('vae')} | "
            f"{fmt_mib(r['pipeline_bytes'])} | {fmt(r.get('quantized_ratio'), '.3f')}x | "
            f"{fmt(r.get('image_diff_vs_ref'), '.4f')} |")
    return "\n".join(out)


def stage_table(rows: list[dict[str, Any]]) -> str:
    out = ["| scheme | via | CLIP s | T5 s | transformer s (all steps) | VAE decode s | rest s | latency s | "
           "calls s | CPU s (median) | load avg after | RSS after load MiB | "
           "gen peak MiB: T5 / transformer / VAE / rest |",
           "| --- | --- |" + " ---: |" * 10 + " --- |"]
    for r in rows:
        if "error" in r:
            continue
        s = r["stages_s"]
        known = sum(s.get(k, 0.0) for k in ("text_encoder", "text_encoder_2", "transformer", "vae"))
        calls = ", ".join(f"{x:.2f}" for x in r["latencies_s"])
        p = r.get("stage_peak_over_baseline_mib", {})
        peaks = " / ".join(fmt(p.get(k), ".0f") for k in ("text_encoder_2", "transformer", "vae", "other"))
        out.append(f"| {r['scheme']} | {via_label(r)} | {s.get('text_encoder', 0):.2f} | "
                   f"{s.get('text_encoder_2', 0):.2f} | "
                   f"{s.get('transformer', 0):.2f} | {s.get('vae', 0):.2f} | {r['latency_s'] - known:.2f} | "
                   f"{r['latency_s']:.2f} | {calls} | {fmt(r.get('cpu_s'), '.1f')} | "
                   f"{fmt(r.get('load_average_after'), '.2f')} | "
                   f"{fmt(r.get('rss_after_load_over_baseline_mib'), '.0f')} | "
                   f"{peaks} |")
    return "\n".join(out)


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three goals, each with its verdict and figures."""
    found: list[dict[str, Any]] = []
    by_key = {(r["scheme"], r["via"]): r for r in rows}
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        ours, theirs = by_key.get((scheme, "quantserve")), by_key.get((scheme, "diffusers"))
        if ours is None or "error" in ours:
            continue
        if theirs is None:
            continue
        if "error" in theirs:
            found.append({"goal": f"{scheme}: quantserve no slower than diffusers", "met": None,
                          "why": "no diffusers figure: diffusers' pipeline failed on this machine "
                                 f"({theirs['error'][:200]})"})
            continue
        ratio = ours["latency_s"] / theirs["latency_s"]
        found.append({"goal": f"{scheme}: quantserve no slower than diffusers", "met": ratio <= 1.0,
                      "why": f"{ours['latency_s']:.2f} s vs {theirs['latency_s']:.2f} s = {ratio:.2f}x"})
    nf4 = by_key.get(("nf4", "quantserve"))
    if nf4 and "error" not in nf4:
        held, bf16 = pair_bytes(nf4)
        comps = nf4["components"]
        parts = ", ".join(f"{c} {comps[c]['bytes'] / MIB:.0f}/{comps[c]['bf16_bytes'] / MIB:.0f} MiB"
                          for c in QUANTIZED)
        found.append({"goal": f"nf4: transformer + T5 bytes <= {NF4_GOAL:.2f}x bf16", "met": held / bf16 <= NF4_GOAL,
                      "why": f"{held / MIB:.0f} / {bf16 / MIB:.0f} MiB = {held / bf16:.3f}x ({parts})"})
    for phase, key in (("load", "load_peak_over_baseline_mib"), ("generation", "gen_peak_over_baseline_mib")):
        for r in rows:
            if r["via"] != "quantserve" or "error" in r:
                continue
            found.append({"goal": f"{r['scheme']}: peak RSS during {phase} within the bound",
                          "met": r[key] <= r["rss_bound_mib"],
                          "why": f"{r[key]:.0f} vs {r['rss_bound_mib']:.0f} MiB = pipeline "
                                 f"{r['pipeline_bytes'] / MIB:.0f} + "
                                 f"largest layer + {OVERHEAD_MIB:.0f}"})
    return found


def verdict(met: bool | None) -> str:
    return "met" if met else ("not measured" if met is None else "NOT met")


def report(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    msl = args.max_sequence_length
    msl_note = "FLUX's default" if msl == 512 else "lowered from FLUX's 512"
    lines = [
        f"### {PRESETS.get(info['preset'], info['preset'])} FluxPipeline: {args.size}x{args.size}, "
        f"{args.steps} step{'s' if args.steps > 1 else ''}, "
        f"max_sequence_length {msl} ({msl_note}), median of {args.repeats} after 1 warm-up",
        "",
        "Command: " + "; re-run rows: ".join(f"`{c}`" for c in info["commands"]),
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, "
        f"{fmt(info['machine']['ram_gib'], '.1f')} GiB RAM, torch {info['machine']['torch']} CPU, "
        f"{args.threads} torch threads. "
        + " ".join(f"{'Run' if i == 0 else 'Re-run'} {run['date']}: 1/5/15-min load average "
                   f"{run['load_before']} before, {run['load_after']} after, {run['wall_s'] / 60:.1f} min."
                   for i, run in enumerate(info["runs"])),
        "",
        f"Pipeline: {info['model']}. Every scheme quantizes the transformer and T5 (text_encoder_2); CLIP and the "
        f"VAE stay bf16. Peak RSS in MiB over the baseline after imports ({info['peak_method']}); RSS bound = the "
        f"row's pipeline bytes + the largest layer in bf16 ({info['largest_mib']:.0f} MiB, {info['largest_name']}) + "
        f"{OVERHEAD_MIB:.0f} MiB. Latency: one whole pipeline call (prompt encoding, {args.steps} denoising "
        f"step{'s' if args.steps > 1 else ''}, VAE decode, PIL image), seed {args.seed}. vs diffusers: quantserve's "
        "latency / diffusers' with the same scheme. "
        + (f"Image diff: mean |pixel difference| (0..1) to the {info['image_ref']} image (random weights: a "
           "consistency check, not a quality figure)." if info["image_ref"]
           else "Image diff: none (no bf16 row to compare with)."),
        "",
        table(rows),
        "",
        "Where the time goes (the median call):",
        "",
        stage_table(rows),
        "",
        "Goals:",
        "",
    ]
    for g in info["goals"]:
        lines.append(f"- {g['goal']}: **{verdict(g['met'])}** ({g['why']})")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=DEFAULT_SCHEMES,
                   help="comma-separated quantserve schemes, applied to transformer and T5 "
                        f"(default: {DEFAULT_SCHEMES}); "
                        f"diffusers' own pipeline runs beside: {', '.join(DIFFUSERS_SCHEMES)}")
    p.add_argument("--size", type=int, default=256, help="image height and width in pixels (default: 256)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    p.add_argument("--max-sequence-length", type=int, default=512,
                   help="T5 tokens per prompt (FLUX pads the prompt to this; default: 512, FLUX's own; a lower "
                        "value is named in the table heading)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row after one warm-up; the median is "
                                                          "reported (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every row (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="generator seed of every call (default: 0)")
    p.add_argument("--preset", default="flux-real-width", choices=list(PRESETS),
                   help="the pipeline to build and use when --model is not given (default: flux-real-width; tiny: the "
                        "tests' few-MB FLUX)")
    p.add_argument("--model", help="use this FLUX pipeline directory instead of building a preset")
    p.add_argument("--cache-dir", help="where presets are built once (default: $QUANTSERVE_CACHE_DIR/bench, else "
                                       "~/.cache/quantserve/bench)")
    p.add_argument("--vias", default="quantserve,diffusers",
                   help="which loaders to measure, comma-separated (default: quantserve,diffusers)")
    p.add_argument("--no-diffusers", action="store_true", help="quantserve rows only (same as --vias quantserve)")
    p.add_argument("--out", default="benchmarks/pipeline.md", help="markdown report (default: benchmarks/pipeline.md)")
    p.add_argument("--json", action="store_true", help="print every row, the goals and the machine as JSON on stdout "
                                                       "(the markdown still goes to --out)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one row may take (default: 900)")
    p.add_argument("--merge", metavar="PREVIOUS.json",
                   help="the --json output of an earlier run with the same settings: the rows measured now replace its "
                        "rows of the same scheme and via (marked re-run), and the report covers them all")
    p.add_argument("--from-json", metavar="RUN.json",
                   help="measure nothing: write the report of an earlier --json run again (--out, --json)")
    p.add_argument("--wait-idle", type=float, metavar="LOAD",
                   help="before each row, wait until the 1-min load average is below LOAD (at most --wait-idle-max s)")
    p.add_argument("--wait-idle-max", type=float, default=300, help="seconds to wait per row for --wait-idle "
                                                                    "(default: 300)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--via", default="quantserve", choices=["quantserve", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--image-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not set(args.vias.split(",")) <= {"quantserve", "diffusers"}:
        parser().error(f"--vias {args.vias!r}: accepted values are quantserve and diffusers")
    for name in ("size", "steps", "repeats", "threads", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if args.size % 16:
        parser().error("--size must be a multiple of 16 (FLUX packs 2x2 latent patches of the 8x VAE)")
    from quantserve.runtime.schemes import SCHEMES

    schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s != "bf16" and s not in SCHEMES]
    if unknown or not schemes:
        parser().error(f"unknown scheme(s) {', '.join(unknown) or '(none given)'}; "
                       f"accepted: bf16, {', '.join(SCHEMES)}")
    if args.from_json:  # re-render the report of an earlier --json run, measuring nothing
        doc = json.loads(Path(args.from_json).read_text())
        rows, runs = doc["rows"], doc["info"]["runs"]
        for key in COMPARABLE:
            setattr(args, key, doc["settings"][key])
        return finish(args, rows, runs, ensure_pipeline(args))
    previous = None
    if args.merge:
        previous = json.loads(Path(args.merge).read_text())
        for key in COMPARABLE:
            if previous["settings"].get(key) != getattr(args, key):
                parser().error(f"--merge {args.merge}: its rows were measured with {key} = "
                               f"{previous['settings'].get(key)!r}, this run with {getattr(args, key)!r}")
    started = time.perf_counter()
    run_info = {"command": "python benchmarks/pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
                "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    model_dir = ensure_pipeline(args)
    import tempfile

    images = Path(tempfile.mkdtemp(prefix="quantserve-pipeline-bench-"))
    vias = [v for v in args.vias.split(",") if v and not (args.no_diffusers and v == "diffusers")]
    plan = [(s, via) for s in schemes for via in vias if via == "quantserve" or s in DIFFUSERS_SCHEMES]
    rows = []
    for i, (scheme, via) in enumerate(plan, 1):
        if args.wait_idle is not None:
            wait_for_idle(args.wait_idle, args.wait_idle_max)
        log(f"[pipeline] [{i}/{len(plan)}] {scheme} via {via} (fresh process) ...")
        image = images / f"{scheme}-{via}.npy"
        row = run_row(args, model_dir, scheme, via, image)
        row["image"] = str(image)
        row["load_average_after"] = os.getloadavg()[0]
        if "error" in row:
            log(f"[pipeline] [{i}/{len(plan)}] {scheme} via {via}: failed: {row['error']}")
        else:
            log(f"[pipeline] [{i}/{len(plan)}] {scheme} via {via}: load {row['load_s']:.1f} s, latency "
                f"{row['latency_s']:.2f} s, peak {row['load_peak_over_baseline_mib']:.0f}/"
                f"{row['gen_peak_over_baseline_mib']:.0f} MiB (load/generation)")
        rows.append(row)
    run_info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run_info["wall_s"] = time.perf_counter() - started
    runs = [run_info]
    if previous is not None:  # this run's rows replace the previous run's of the same scheme and via
        for row in rows:
            row["rerun"] = True
        fresh = {(r["scheme"], r["via"]): r for r in rows}
        merged = [fresh.pop((r["scheme"], r["via"]), r) for r in previous["rows"]]
        rows = merged + list(fresh.values())
        runs = previous["info"]["runs"] + runs
    return finish(args, rows, runs, model_dir)


def finish(args: argparse.Namespace, rows: list[dict[str, Any]], runs: list[dict[str, Any]], model_dir: Path) -> int:
    """Derived figures, goals, the markdown report (--out) and the JSON document (--json) of the rows."""
    largest, largest_name = largest_layer_bf16_mib(model_dir)
    add_derived(rows, largest)
    ok = [r for r in rows if "error" not in r]
    info = {
        "commands": [r["command"] for r in runs], "runs": runs,
        "machine": machine(), "preset": "custom" if args.model else args.preset, "model": str(model_dir),
        "largest_mib": largest, "largest_name": largest_name,
        "peak_method": ok[0]["peak_method"] if ok else "-", "image_ref": ok[0].get("image_ref") if ok else None,
        "goals": goals(rows),
    }
    text = report(args, rows, info)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        log(f"[pipeline] wrote {args.out}")
    if args.json:
        print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "via", "image_out")},
                          "info": info, "rows": rows}, indent=2, default=str))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
