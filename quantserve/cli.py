"""The `quantserve` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from quantserve.runtime.inspect import Inspection, inspect_path
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
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for report in reports:
            _print_inspection(report)
    return EXIT_OK if all(r.valid for r in reports) else EXIT_INVALID


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
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("schemes", help="list the named quantization schemes (--scheme values)",
                       description="List the named presets every command accepts as --scheme, with their backend.")
    p.add_argument("--json", action="store_true", help="print the table as JSON, with each scheme's config")
    p.set_defaults(func=cmd_schemes)
    return parser


def _quiet_backend_import_noise(verbose: bool) -> None:
    """torchao logs its GPU-only extensions that fail to load on a CPU, and torch logs deprecations on import."""
    if not verbose:
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_backend_import_noise(args.verbose)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
