"""The `quantserve` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantserve.runtime.inspection import Inspection, inspect_path
from quantserve.runtime.schemes import SCHEMES

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _print_inspection(report: Inspection) -> None:
    title = f"{report.component}: {report.path}" if report.component else str(report.path)
    print(title)
    print(f"  model class : {report.model_class or 'unknown'}")
    print(f"  backend     : {report.backend}")
    if report.config is not None:
        print(f"  scheme      : {report.config.summary()}")
        print("  config      :")
        for line in report.config.to_json_string(use_diff=True).splitlines():
            print(f"    {line}")
    elif report.raw_config is None:
        print("  scheme      : not quantized (no quantization_config)")
    for row in report.requirement_rows():
        state = "ok" if row["problem"] is None else "MISSING" if row["installed"] is None else "TOO OLD"
        print(f"  needs       : {row['package']:<28} installed: {row['installed'] or '-':<10} {state}")
        if row["problem"]:
            print(f"                {row['problem']}")
    if report.gguf_types:
        types = ", ".join(f"{name} x{count}" for name, count in sorted(report.gguf_types.items()))
        print(f"  gguf tensors: {types}")
    weights = ", ".join(f"{name} ({_format_bytes(size)})" for name, size in report.weights) or "none found"
    print(f"  weights     : {weights}")
    for error in report.errors:
        print(f"  error       : {error}")
    print(f"  status      : {'valid' if report.valid else 'INVALID'}")


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        reports = inspect_path(args.path)
    except FileNotFoundError as exc:
        print(f"quantserve inspect: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json and not args.load:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif not args.json:
        for report in reports:
            _print_inspection(report)
    ok = all(r.valid for r in reports)
    if args.load and ok:
        try:
            loaded = _load(args.path, None, args.device)
        except (ValueError, TypeError, RuntimeError) as exc:
            print(f"quantserve inspect --load: {exc}", file=sys.stderr)
            return EXIT_INVALID
        report = loaded.quantserve_report
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print("\nload report")
            print(report.table())
    return EXIT_OK if ok else EXIT_INVALID


def is_pipeline_dir(path: str | Path) -> bool:
    """A diffusers pipeline directory (model_index.json naming a diffusers pipeline class), not a single model."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return False
    import diffusers

    cls = getattr(diffusers, str(name), None)
    return isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)


def _load(path: str, spec: Any, device: str) -> Any:
    """A pipeline directory through load_pipeline, anything else through load_model (progress bars on)."""
    if is_pipeline_dir(path):
        from quantserve.runtime.pipeline import load_pipeline

        return load_pipeline(path, spec, device=device, progress=True)
    from quantserve.runtime.loader import load_model

    return load_model(path, spec, device=device, progress=True)


def parse_components(text: str) -> dict[str, str]:
    """'transformer=nf4,text_encoder_2=int8wo' -> {component: scheme}; a ValueError names the bad entry."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, scheme = item.partition("=")
        if not sep or not name.strip() or scheme.strip() not in SCHEMES:
            raise ValueError(f"--components: {item!r} is not COMPONENT=SCHEME with a scheme among {', '.join(SCHEMES)}")
        mapping[name.strip()] = scheme.strip()
    if not mapping:
        raise ValueError("--components: expected COMPONENT=SCHEME[,COMPONENT=SCHEME...], e.g. transformer=nf4,text_encoder_2=int8wo")
    return mapping


def _spec(args: argparse.Namespace) -> Any:
    """What --scheme / --config / --components ask for (None: as the checkpoint says)."""
    if getattr(args, "components", None):
        return parse_components(args.components)
    if getattr(args, "config", None):
        return _load_config_file(args.config)
    return getattr(args, "scheme", None)


def _load_config_file(path: str) -> dict:
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"quantserve: --config {path}: {exc}") from None
    # accept a bare quantization_config block or a whole config.json holding one
    return data.get("quantization_config", data) if isinstance(data, dict) else data


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantserve.runtime.loader import save_quantized

    try:
        model = _load(args.model_dir, _spec(args), args.device)
        out = save_quantized(model, args.out)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as exc:
        print(f"quantserve quantize: {exc}", file=sys.stderr)
        return EXIT_INVALID
    report = model.quantserve_report
    print(report.table())
    print(f"wrote {out}")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from quantserve.runtime.compare import compare_schemes

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        print(f"quantserve compare: --schemes: unknown {unknown}; accepted: {', '.join(SCHEMES)}", file=sys.stderr)
        return EXIT_USAGE
    model_dir = args.model_dir
    if is_pipeline_dir(model_dir):
        denoiser = next((Path(model_dir) / n for n in ("transformer", "unet") if (Path(model_dir) / n).is_dir()), None)
        if denoiser is None:
            print(f"quantserve compare: {model_dir} has no transformer/ or unet/ to compare", file=sys.stderr)
            return EXIT_USAGE
        print(f"pipeline directory: comparing its denoiser, {denoiser}")
        model_dir = str(denoiser)
    results = compare_schemes(model_dir, schemes, seed=args.seed, batch=args.batch, progress=True)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(f"{'scheme':<15} {'rel. error':>10} {'model MiB':>10} {'vs bf16':>8}  worst layers (own relative error)")
        for r in results:
            if r.error:
                print(f"{r.scheme:<15} {'-':>10} {'-':>10} {'-':>8}  FAILED: {r.error}")
                continue
            worst = ", ".join(f"{name} {err:.3g}" for name, err in r.worst_layers[:3])
            ratio = r.model_bytes / r.bf16_bytes if r.bf16_bytes else 1.0
            print(f"{r.scheme:<15} {r.relative_error:>10.4f} {r.model_bytes / 2**20:>10.3f} {ratio:>7.3f}x  {worst}")
    return EXIT_OK if not any(r.error for r in results) else EXIT_INVALID


def _models_for_kernels(args: argparse.Namespace) -> list[tuple[str, Any, list[int]]]:
    """(component, model, the M values its Linear layers see) for a model directory or each model of a pipeline:
    a denoiser sees its image tokens, a text encoder its prompt tokens (--text-tokens)."""
    from quantserve.runtime.autotune import tokens_for

    loaded = _load(args.model_dir, _spec(args), args.device)
    if not is_pipeline_dir(args.model_dir):
        return [("model", loaded, sorted({args.batch, tokens_for(loaded, args.resolution, args.batch)}))]
    out = []
    for name in loaded.quantserve_report.components:
        model = getattr(loaded, name)
        if name in ("transformer", "unet"):
            m_values = sorted({args.batch, tokens_for(model, args.resolution, args.batch)})
        else:
            m_values = [args.batch * args.text_tokens]
        out.append((name, model, m_values))
    return out


def cmd_autotune(args: argparse.Namespace) -> int:
    from quantserve.runtime.autotune import TuneCache, autotune, device_key
    from quantserve.runtime.router import KernelPolicy

    cache = TuneCache()
    results = []
    targets = [t.strip() for t in (args.triton_targets or "").split(",") if t.strip()]
    if targets:
        from quantserve.kernels.aot import TARGETS

        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            print(f"error: --triton-targets: unknown {', '.join(unknown)}; accepted: {', '.join(TARGETS)}",
                  file=sys.stderr)
            return EXIT_INVALID
    for _, model, m_values in _models_for_kernels(args):
        if targets:
            from quantserve.runtime.autotune import prefill_triton

            made = prefill_triton(model, m_values, targets, progress=True)
            print("triton cache: " + ", ".join(f"{t} {n} compiles" for t, n in made.items()) +
                  f" in {os.environ.get('TRITON_CACHE_DIR') or '~/.triton/cache'}")
        results += autotune(model, m_values, device=args.device, cache=cache, policy=KernelPolicy.from_env(),
                            progress=True)
    fresh = [r for r in results if not r.cached]
    print(f"device: {device_key(args.device)}")
    print(f"cache : {cache.path} ({len(fresh)} shapes tuned, {len(results) - len(fresh)} found in the cache)")
    print(f"{'shape':<44} {'winner':<16} timings (ms)")
    for r in sorted(results, key=lambda r: r.key):
        timings = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.timings_ms.items(), key=lambda kv: kv[1]))
        rejected = "; rejected: " + ", ".join(f"{k} ({v})" for k, v in r.rejected.items()) if r.rejected else ""
        print(f"{r.key:<44} {r.winner:<16} {timings}{rejected}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from quantserve.runtime.autotune import TuneCache
    from quantserve.runtime.router import KernelPolicy, nearest_entry, quant_layers, route

    entries = TuneCache().entries(args.device)
    decisions, layers = [], {}
    for component, model, m_values in _models_for_kernels(args):
        prefix = "" if component == "model" else f"{component}."
        for d in route(model, args.device, m=max(m_values), policy=KernelPolicy.from_env(), cache=entries):
            d.layer = prefix + d.layer
            decisions.append(d)
        layers.update((prefix + name, (layer, max(m_values))) for name, layer in quant_layers(model))
    if args.json:
        print(json.dumps([d.__dict__ for d in decisions], indent=2))
        return EXIT_OK
    if not decisions:
        print("no quantized layers: every Linear layer runs as a dense torch matmul")
    print(f"{'layer':<48} {'format':<18} {'N x K':>11}  {'kernel':<12} why; alternatives")
    for d in decisions:
        layer, m = layers[d.layer]
        _, entry = nearest_entry(entries, layer, m)  # the entry the router read (the nearest tuned M bucket)
        timings = (entry or {}).get("timings_ms", {})
        others = ", ".join(f"{k} {timings[k]:.3f} ms" if k in timings else k for k in d.runnable if k != d.kernel)
        rejected = "; cannot run: " + ", ".join(f"{k} ({v})" for k, v in d.rejected.items()) if d.rejected else ""
        print(f"{d.layer[-48:]:<48} {layer.qweight.fmt:<18} {layer.out_features:>5}x{layer.in_features:<5}  "
              f"{d.kernel:<12} {d.reason}; {others or 'none'}{rejected}")
    return EXIT_OK


def cmd_schemes(args: argparse.Namespace) -> int:
    if args.json:
        rows = [{"name": s.name, "backend": s.backend.value if s.backend else None, "bits": s.bits,
                 "summary": s.summary, "quantization_config": (c.to_dict() if (c := s.config()) else None)}
                for s in SCHEMES.values()]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'scheme':<15} {'backend':<13} {'bits/w':>6}  summary")
    for s in SCHEMES.values():
        print(f"{s.name:<15} {(s.backend.value if s.backend else '-'):<13} {s.bits:>6.2f}  {s.summary}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantserve",
        description="Serve quantized diffusion models: read a diffusers model's quantization_config, load it through "
                    "its backend (bitsandbytes, torchao, optimum-quanto, GGUF, NVIDIA ModelOpt) and serve it.",
        epilog="Run 'quantserve COMMAND --help' for the options of one command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the backends' own import-time log lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="show a model's quantization config, its backend and the packages it needs",
                       description="Read a model directory, its config.json, a pipeline directory (model_index.json) "
                                   "or a .gguf file; print the parsed quantization config, the backend, the packages "
                                   "it needs and whether they are installed, and any validation error. Exits 1 when a "
                                   "config is invalid, 2 when the path holds no model.")
    p.add_argument("path", help="model directory, config.json, pipeline directory or .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--load", action="store_true",
                   help="also load the model through its backend and print the per-layer load report")
    p.add_argument("--device", default="cpu", help="device to load on with --load (default: cpu)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("quantize", help="quantize a model directory and write a pre-quantized checkpoint",
                       description="Load MODEL_DIR, quantize every Linear layer with a scheme or a config file, and "
                                   "write a pre-quantized checkpoint to OUT (safetensors with the packed tensors, or a "
                                   ".gguf for gguf-* schemes, and config.json with its quantization_config). OUT is "
                                   "written to a temporary directory and renamed into place: a failure leaves nothing "
                                   "half-written. Prints the per-layer load report.")
    p.add_argument("model_dir", help="a diffusers model directory (config.json + safetensors) or a pipeline directory "
                                     "(model_index.json): every component is written, tokenizers and scheduler too")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scheme", choices=list(SCHEMES), metavar="NAME",
                     help="a named scheme (a pipeline's denoiser only): " + ", ".join(SCHEMES))
    how.add_argument("--config", metavar="FILE.json", help="a quantization_config block (or a config.json holding one); "
                     "for a pipeline also a mapping component -> config, or a PipelineQuantizationConfig dict")
    how.add_argument("--components", metavar="C=S,...",
                     help="a pipeline: a scheme per component, e.g. transformer=nf4,text_encoder_2=int8wo")
    p.add_argument("--out", required=True, help="output directory (replaced atomically if it exists)")
    p.add_argument("--device", default="cpu", help="device to quantize on (default: cpu)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("compare", help="run bf16 and several schemes on the same inputs; relative errors, worst layers",
                       description="Load MODEL_DIR in bf16 and with each scheme, feed every variant the same seeded "
                                   "random inputs, and print each output's relative error against bf16, its size, and "
                                   "the layers whose own error is largest (each fed the bf16 layer's input).")
    p.add_argument("model_dir", help="a diffusers model directory (a pipeline directory: its transformer or unet)")
    p.add_argument("--schemes", required=True, help="comma-separated scheme names, e.g. nf4,int8wo,gguf-q4_k")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared random inputs (default 0)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the inputs (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_compare)

    for command, summary, description, func in (
        ("autotune", "time every kernel for a model's layer shapes on this device and cache the winners",
         "Load MODEL_DIR (quantized with --scheme, or as its config.json says), find its distinct (format, N, K, M) "
         "problems for the resolution and batch a deployment will see, time every kernel that can run each one "
         "(warm-up, median; CUDA events on a GPU), reject any whose output strays from the torch reference, and store "
         "the winners in the autotune cache ($QUANTSERVE_CACHE_DIR, default the user cache directory). Shapes already "
         "in the cache are not tuned again.", cmd_autotune),
        ("explain", "print which kernel each quantized layer gets and why",
         "Load MODEL_DIR, route every quantized layer (kernel policy from QUANTSERVE_FORCE_KERNEL / "
         "QUANTSERVE_DISABLE_KERNELS, then the autotune cache, then the fixed preference) and print a table: layer, "
         "format, shape, chosen kernel, why, and the alternatives with their cached timings.", cmd_explain),
    ):
        p = sub.add_parser(command, help=summary, description=description)
        p.add_argument("model_dir", help="a diffusers model directory, or a pipeline directory (every model component)")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--scheme", choices=list(SCHEMES), metavar="NAME",
                         help="quantize on load with this scheme (a pipeline's denoiser only)")
        how.add_argument("--components", metavar="C=S,...",
                         help="a pipeline: a scheme per component, e.g. transformer=nf4,text_encoder_2=int8wo")
        p.add_argument("--text-tokens", type=int, default=256,
                       help="prompt tokens a pipeline's text encoders see per image (default 256)")
        p.add_argument("--resolution", type=int, default=8, help="image side in the model's input space (default 8)")
        p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
        p.add_argument("--device", default="cpu", help="device to tune on (default cpu; e.g. cuda)")
        if command == "explain":
            p.add_argument("--json", action="store_true", help="print the decisions as JSON")
        else:
            p.add_argument("--triton-targets", metavar="SM,...",
                           help="also compile quantserve's Triton kernels for these GPU targets (e.g. sm_80,sm_90) "
                                "at the model's layer shapes into Triton's cache (TRITON_CACHE_DIR), on any machine, "
                                "so a replica on such a GPU starts without compiling")
        p.set_defaults(func=func)

    from quantserve.default_model.eval_cli import add_eval_command
    from quantserve.serve_cli import add_serve_commands

    add_eval_command(sub)
    add_serve_commands(sub)

    p = sub.add_parser("schemes", help="list the named quantization schemes (--scheme values)",
                       description="List the named presets every command accepts as --scheme, with their backend.")
    p.add_argument("--json", action="store_true", help="print the table as JSON, with each scheme's config")
    p.set_defaults(func=cmd_schemes)
    return parser


def _quiet_backend_import_noise(verbose: bool) -> None:
    """torchao logs its GPU-only extensions that fail to load on a CPU, and torch logs deprecations on import."""
    if not verbose:
        for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                     "bitsandbytes.backends.cpu.ops"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_backend_import_noise(args.verbose)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    from quantserve.runtime.errors import ConfigTypeError

    try:
        return args.func(args)
    except (ValueError, ConfigTypeError, FileNotFoundError) as exc:  # bad input: say what, no traceback
        print(f"quantserve {args.command}: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
