"""The `quantserve eval` command line, kept free of heavy imports so that `quantserve --help` stays fast and quiet.

The work itself lives in `evaluate.py`, imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

BASELINE = "bf16"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the eval command."""
    parser.add_argument("--schemes", default=BASELINE,
                        help="comma-separated schemes, e.g. bf16,fp32,nf4 (bf16 always runs first as the baseline)")
    parser.add_argument("--n", type=int, default=50,
                        help="images per digit (FID fits a 128-d covariance: use n >= 50 for a meaningful FID)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--out", type=Path, default=None, help="directory for PNG grids, one per scheme")
    parser.add_argument("--grid-cols", type=int, default=16, help="samples per digit shown in each PNG grid")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")


def _run(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `eval` (judge the default model per quantization scheme); its func returns the exit code."""
    parser = subparsers.add_parser(
        "eval", help="accuracy/FID of the default digits model per quantization scheme",
        description="Generate N images per digit per scheme from the embedded digits model with fixed seeds and score "
                    "them with a digit classifier trained on a held-out split: class accuracy, Frechet distance of "
                    "classifier features to real digits, and the mean pixel difference to the bf16 image of the same "
                    "seed. Writes a PNG grid per scheme with --out; --json prints the figures as JSON.")
    add_eval_arguments(parser)
    parser.set_defaults(func=_run)
    return parser
