"""The serving subcommands of `quantserve`: serve, generate, loadtest: their arguments, wired to quantserve.serve.

`add_serve_commands(subparsers)` registers them on the main parser (quantserve/cli.py, the one `main`). The work is
in quantserve.serve: the HTTP client (serve/client.py), the load test (serve/loadtest.py), the local Ray lifecycle
(serve/local.py), a replica's generation code (serve/generation.py). Nothing here imports Ray until `serve` runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from quantserve.kernels.atomic_write import atomic_write_bytes
from quantserve.runtime.dtypes import FLOAT_DTYPES
from quantserve.serve.client import DEFAULT_URL, error_message, generations_url, post_json
from quantserve.serve.loadtest import MAX_CONCURRENCY, MAX_REQUESTS, format_summary, run_loadtest

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# `generate --model DIR` runs locally with no server: only the hard ceilings of a serve config bound it
LOCAL_LIMITS = {"max_n": 256, "max_steps": 10_000, "max_size": 4096, "max_prompt_chars": 10_000, "max_guidance": 100.0}


# --- argument types --------------------------------------------------------------------------------------------

def _positive(name: str, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"{name}: must be between 1 and {high}, got {value}")
        return value
    return parse


def _port(text: str) -> int:
    return _positive("port", 65535)(text)


# --- serve --------------------------------------------------------------------------------------------------------

def _load_serve_config(args: argparse.Namespace) -> Any:
    from quantserve.serve.config import ServeConfig, default_config, load_config

    cfg = load_config(args.config) if args.config else default_config()
    data = cfg.model_dump(mode="json")
    if args.host is not None:
        data["http"]["host"] = args.host
    if args.port is not None:
        data["http"]["port"] = args.port
    if args.metrics_port is not None:
        data["metrics"]["port"] = args.metrics_port
    return ServeConfig.model_validate(data)


def cmd_serve(args: argparse.Namespace) -> int:
    from quantserve.serve.config import ConfigError
    from quantserve.serve.local import check_variants

    try:
        cfg = _load_serve_config(args)
    except (ConfigError, ValueError) as exc:
        print(f"quantserve serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problems = check_variants(cfg)
    if problems:
        print("quantserve serve: " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_FAILED
    if args.print_ray_config:
        import yaml

        from quantserve.serve.app import ray_serve_config

        print(yaml.safe_dump(ray_serve_config(cfg), sort_keys=False), end="")
        return EXIT_OK
    from quantserve.serve.local import serve_locally

    ok = serve_locally(cfg, reload=lambda: _load_serve_config(args), config_path=args.config,
                       num_cpus=args.num_cpus, startup_timeout_s=args.startup_timeout)
    return EXIT_OK if ok else EXIT_FAILED


# --- generate -------------------------------------------------------------------------------------------------

def _request_body(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "response_format": "b64_json"}
    for name in ("negative_prompt", "size", "steps", "guidance", "seed", "model", "user"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    body.update(dict(getattr(args, "extra", None) or []))
    body.update(extra)
    return body


def _extra(text: str) -> tuple[str, Any]:
    """--extra NAME=VALUE: the value as JSON when it parses (256, 3.5, true), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
        raise argparse.ArgumentTypeError(f"--extra: expected NAME=VALUE such as max_sequence_length=256, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def generate_mode(args: argparse.Namespace) -> str:
    """'remote' when --url is given, or when --model is not a directory (then it names a variant of the server at
    the default URL, as before); 'local' when --model is a pipeline or model directory and no --url is given."""
    if args.url is not None:
        return "remote"
    model = args.model
    if model is not None and Path(model).expanduser().is_dir():
        return "local"
    if model is not None and (os.sep in model or model.startswith((".", "~"))):
        raise ValueError(f"--model: {model} is not a directory (a pipeline directory generates locally; with --url, "
                         "--model names a variant of the server)")
    return "remote"


def _stem(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(prompt))[:32] or "image"


def _post_ok(command: str, url: str, body: dict[str, Any], timeout: float, headers: dict[str, str] | None
             ) -> tuple[dict[str, str], bytes] | None:
    """POST a JSON body: (response headers, body) of a 200; else None, the reason printed to stderr."""
    try:
        status, response_headers, data = post_json(url, body, timeout, headers)
    except OSError as exc:
        print(f"{command}: cannot reach {url}: {exc}", file=sys.stderr)
        return None
    if status != 200:
        print(f"{command}: HTTP {status}: {error_message(data)}", file=sys.stderr)
        return None
    return response_headers, data


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        mode = generate_mode(args)
    except ValueError as exc:
        print(f"quantserve generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if mode == "local":
        return _generate_local(args)
    if args.scheme or args.config or args.quantization:
        print("quantserve generate: --scheme, --config and --quantization load a model locally: give --model DIR "
              "without --url (a server's variants are quantized as its config says)", file=sys.stderr)
        return EXIT_USAGE
    try:
        url = generations_url(args.url or DEFAULT_URL)
    except ValueError as exc:
        print(f"quantserve generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    headers = {"X-Quantserve-Force-Variant": args.force_variant} if args.force_variant else None
    answer = _post_ok("quantserve generate", url, _request_body(args), args.timeout, headers)
    if answer is None:
        return EXIT_FAILED
    resp_headers, body = answer
    payload = json.loads(body)
    variant = resp_headers.get("x-quantserve-variant", "unknown")
    seed = payload.get("quantserve", {}).get("seed", resp_headers.get("x-quantserve-seed", "x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(args.prompt)
    for i, item in enumerate(payload["data"]):
        path = out / f"{stem}-{variant}-seed{seed}-{i}.png"
        atomic_write_bytes(path, base64.b64decode(item["b64_json"]))
        print(f"wrote {path}")
    print(f"variant {variant}, seed {seed}, {len(payload['data'])} image(s)")
    return EXIT_OK


def _local_quantization(args: argparse.Namespace) -> Any:
    """--scheme NAME, --config FILE.json or --quantization JSON: any form a serve config's `quantization` takes."""
    if args.scheme:
        return args.scheme
    if args.config:
        try:
            data = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--config {args.config}: {exc}") from None
        return data.get("quantization_config", data) if isinstance(data, dict) else data  # or a whole config.json
    if args.quantization:
        try:
            return json.loads(args.quantization)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--quantization: not valid JSON: {exc}") from None
    return None


def _generate_local(args: argparse.Namespace) -> int:
    """Load the model in this process through the family code a replica runs, generate with a progress bar over
    the denoising steps, and write OUT/<prompt>-seed<seed + i>.png."""
    import random

    from pydantic import ValidationError
    from tqdm import tqdm

    from quantserve.serve.config import ConfigError, LimitsConfig, VariantConfig, format_validation_error
    from quantserve.serve.generation import BatchGenerator, ClientError, load_variant

    try:
        variant = VariantConfig(name="local", model=str(Path(args.model).expanduser()),
                                quantization=_local_quantization(args), dtype=args.dtype,
                                resources={"num_gpus": 1 if args.device.startswith("cuda") else 0})
        limits = LimitsConfig(**LOCAL_LIMITS).for_variant(variant.limits)
    except ValidationError as exc:
        print(f"quantserve generate: {format_validation_error(exc)}",
              file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"quantserve generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = args.seed if args.seed is not None else random.randrange(0, 2**31 - 1)
    job = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "n": args.n, "size": args.size,
           "steps": args.steps, "guidance": args.guidance, "seed": seed, "extras": dict(args.extra or [])}
    try:
        loaded = load_variant(variant, limits, "--model")
        generator = BatchGenerator(loaded)
        normal = generator.prepare(job)
    except ClientError as exc:
        print(f"quantserve generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, ValueError, TypeError, OSError) as exc:
        print(f"quantserve generate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{loaded.engine.pipeline_class} ({loaded.engine.family}), {loaded.scheme}, {variant.dtype} on "
          f"{loaded.device}: {normal['n']} image(s) {normal['size']}, {normal['steps']} steps, guidance "
          f"{normal['guidance']}, seed {seed}", flush=True)
    with tqdm(total=normal["steps"], desc="denoising", unit="step", disable=args.no_progress) as bar:
        outcomes, _ = generator.run([normal], lambda done, steps: bar.update(done - bar.n))
    outcome = outcomes[0]
    if outcome["status"] != 200:
        print(f"quantserve generate: {outcome['message']}", file=sys.stderr)
        return EXIT_FAILED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(outcome["images"]):
        path = out / f"{_stem(args.prompt)}-seed{seed + i}.png"
        atomic_write_bytes(path, png)
        print(f"wrote {path}")
    return EXIT_OK


# --- loadtest -------------------------------------------------------------------------------------------------

def cmd_loadtest(args: argparse.Namespace) -> int:
    if getattr(args, "ramp", None):  # a load that follows a schedule, with a timeline (serve/ramp.py)
        from quantserve.serve.ramp import cmd_ramp

        return cmd_ramp(args, _request_body(args))
    try:
        url = generations_url(args.url)
    except ValueError as exc:
        print(f"quantserve loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def body_for(i: int) -> dict[str, Any]:
        user = f"loadtest-user-{i % args.users}" if args.users else None
        return _request_body(args, **({"user": user} if user else {}))

    summary = run_loadtest(url, body_for, args.requests, args.concurrency, args.timeout, args.max_seconds, args.n)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(format_summary(summary)))
        if summary["skipped_after_max_seconds"]:
            print(f"stopped after --max-seconds {args.max_seconds}: {summary['skipped_after_max_seconds']} not sent")
    return EXIT_OK if summary["ok"] > 0 else EXIT_FAILED


def format_report(report: dict[str, Any]) -> list[str]:
    """The A/B report as a table per variant, then one line per comparison."""
    def ms(x: dict[str, Any] | None) -> str:
        return f"{x['value']:.0f} [{x['ci95'][0]:.0f}, {x['ci95'][1]:.0f}]" if x else "-"

    window = f"last {report['window_s']:g} s" if report["window_s"] else "since start"
    lines = [f"A/B report, {window} ({report['span_s']} s of traffic, {report['requests']} requests); baseline "
             f"{report['baseline']}",
             f"{'variant':<14}{'requests':>9}{'errors':>8}  {'p50 ms [95% CI]':<22}{'p95 ms [95% CI]':<22}"
             f"{'img/s':>7}  {'SSIM mean/p5':<16}{'feedback':>9}"]
    for name, v in report["variants"].items():
        fid = next(iter(v.get("fidelity", {}).values()), None)
        ssim = f"{fid['ssim_mean']:.3f}/{fid['ssim_p5']:.3f}" if fid else "-"
        fb = v.get("feedback") or {}
        feedback = f"{fb['mean']:+.2f} ({fb['count']})" if fb.get("count") else "-"
        rate = "-" if v["images_per_s"] is None else f"{v['images_per_s']:.2f}"
        lines.append(f"{name:<14}{v['requests']:>9}{v['errors']:>8}  {ms(v['p50_ms']):<22}{ms(v['p95_ms']):<22}"
                     f"{rate:>7}  {ssim:<16}{feedback:>9}")
    for c in report["comparisons"]:
        lines.append(c["text"])
        for g in c.get("guards", []):
            lines.append(f"  guard: {g['text']}" if "text" in g else f"  guard waits: {g['waits']}")
    if report.get("rollout"):
        lines += format_rollout(report["rollout"])
    return lines


def format_rollout(r: dict[str, Any]) -> list[str]:
    """The rollout's state in a few lines: where it is, what it waits for, why it stopped."""
    steps = " -> ".join(f"[{s:g}]" if i == r["step"] else f"{s:g}" for i, s in enumerate(r["steps"]))
    lines = [f"rollout {r['candidate']} vs {r['baseline']}: {r['status']}, weight {r['weight']:g}, steps {steps}, "
             f"{r['step_elapsed_s']:.0f} s into the step"]
    lines += [f"  waits: {w}" for w in r.get("waiting", [])]
    if r.get("failed"):
        lines.append(f"  stopped by {r['failed']['guard']}: {r['failed']['text']}")
    for e in r.get("events", [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        lines.append(f"  {when} {e['decision']:<9} step {e['step']} weight {e['weight']:g}  {e.get('reason', '')}")
    return lines


def cmd_ab_report(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from .serve.client import api_base, get_json

    try:
        base = api_base(args.url)
    except ValueError as exc:
        print(f"quantserve ab report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    query = urlencode({k: v for k, v in (("window", args.window), ("baseline", args.baseline)) if v})
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        status, body = get_json(f"{base}/v1/ab/report" + (f"?{query}" if query else ""), args.timeout, headers)
    except OSError as exc:
        print(f"quantserve ab report: cannot reach {base}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)[:300]
        print(f"quantserve ab report: {status}: {message}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(body, indent=2) if args.json else "\n".join(format_report(body)))
    return EXIT_OK


def cmd_ab_action(args: argparse.Namespace) -> int:
    """promote | rollback | pause | resume: POST /v1/ab/rollout, then print the rollout's state."""
    from .serve.client import api_base

    command = f"quantserve ab {args.ab_command}"
    try:
        base = api_base(args.url)
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    answer = _post_ok(command, f"{base}/v1/ab/rollout", {"action": args.ab_command}, args.timeout, headers)
    if answer is None:
        return EXIT_FAILED
    rollout = json.loads(answer[1])["rollout"]
    print(json.dumps(rollout, indent=2) if args.json else "\n".join(format_rollout(rollout)))
    return EXIT_OK


# --- registration -----------------------------------------------------------------------------------------------

def _add_request_options(p: argparse.ArgumentParser, prompt_required: bool, url_default: str | None = DEFAULT_URL,
                         model_help: str = "a variant name (default: the A/B router assigns one)") -> None:
    p.add_argument("--url", default=url_default, help=f"quantserve's base URL (default {DEFAULT_URL})")
    p.add_argument("--prompt", required=prompt_required, default=None if prompt_required else "7",
                   help="what to draw: text for a text-to-image pipeline; a digit 0-9 or its word for the digits model")
    p.add_argument("--negative-prompt", help="what to steer away from (pipelines that take one)")
    p.add_argument("--n", type=_positive("--n", 256), default=1, help="images per request (default 1)")
    p.add_argument("--size", help="WxH, e.g. 512x512 or 768x512 (default: the variant's)")
    p.add_argument("--steps", type=_positive("--steps", 10_000), help="denoising steps (default: the variant's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's; 1.0 for the digits)")
    p.add_argument("--extra", type=_extra, action="append", metavar="NAME=VALUE",
                   help="a pipeline's extra request field, e.g. max_sequence_length=256 (repeatable)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one response (default 120)")


def add_serve_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`, `generate`, `loadtest` and `ab` on the `quantserve` parser's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve models over HTTP with Ray Serve: A/B router, autoscaling, Prometheus metrics",
        description="Start a local Ray instance and serve the variants of CONFIG.yaml (with no file: the embedded "
                    "digits model in two variants, bf16 and nf4, split 50/50) behind an OpenAI-style images API. "
                    "Prints the URLs of the API and of the Prometheus metrics; Ctrl-C (or SIGTERM) stops it and "
                    "every Ray process it started; SIGHUP re-reads CONFIG.yaml (a change of the experiment alone "
                    "reconfigures the router live).")
    p.add_argument("config", nargs="?", help="serve config YAML (see examples/serve.yaml)")
    p.add_argument("--host", help="HTTP host (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--metrics-port", type=_port, help="Prometheus metrics port of Ray's metrics agent (default 8080)")
    p.add_argument("--num-cpus", type=int, help="CPUs the local Ray instance offers (default: all)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every variant to load")
    p.add_argument("--print-ray-config", action="store_true",
                   help="print the equivalent Ray Serve config (for `serve deploy` or KubeRay) and exit")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "generate", help="generate images locally from a pipeline directory, or ask a running quantserve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images and write them as PNG files.\n\n"
                    "Which way it goes:\n"
                    "  --url given                 remote: POST to that server; --model names one of its variants\n"
                    "  no --url, --model is a dir  local: load the pipeline in this process (quantized with --scheme,\n"
                    "                              --config or --quantization), no server; a progress bar over the\n"
                    "                              denoising steps; writes OUT/<prompt>-seed<seed + i>.png\n"
                    "  no --url, --model not a dir remote, to " + DEFAULT_URL + " (as before --model DIR existed)\n\n"
                    "Remote writes OUT/<prompt>-<variant>-seed<seed>-<i>.png. Local generation runs the code a "
                    "replica runs, so for the same seed, size, steps, guidance, dtype and torch threads it gives the "
                    "served image.",
        epilog="examples:\n"
               "  quantserve generate --model ./flux-dir --prompt 'a red car' --scheme nf4 --size 512x512 --steps 4 "
               "--seed 0 --out pngs/\n"
               "  quantserve generate --model ./flux-dir --prompt 'a red car' "
               "--quantization '{\"transformer\": \"nf4\", \"text_encoder_2\": \"int8wo\"}' --out pngs/\n"
               "  quantserve generate --url http://127.0.0.1:8000 --prompt 7 --n 4 --out sevens/")
    _add_request_options(p, prompt_required=True, url_default=None,
                         model_help="local: a pipeline directory (model_index.json) or a digits model directory; "
                                    "remote: a variant name (default: the A/B router assigns one)")
    p.add_argument("--seed", type=int, help="seed of the first image (image i uses seed + i; default: drawn at random)")
    p.add_argument("--user", help="remote: user id for sticky A/B assignment")
    p.add_argument("--force-variant", help="remote: force a variant with the X-Quantserve-Force-Variant header")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--scheme", metavar="NAME", help="local: quantize the denoiser with a named scheme (nf4, int8wo, ...)")
    how.add_argument("--config", metavar="FILE.json", help="local: a JSON file with any form a serve config's "
                     "`quantization` takes (a quantization_config block, a mapping component -> scheme, a "
                     "PipelineQuantizationConfig)")
    how.add_argument("--quantization", metavar="JSON", help="local: the same as inline JSON, e.g. "
                     "'{\"transformer\": \"nf4\", \"text_encoder_2\": \"int8wo\"}'")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="bfloat16",
                   help="local: the dtype to load and compute in (default bfloat16, as a serve config's)")
    p.add_argument("--device", default="cpu", help="local: cpu or cuda (default cpu)")
    p.add_argument("--threads", type=_positive("--threads", 1024),
                   help="local: torch threads (default torch's; a replica uses its resources.torch_threads)")
    p.add_argument("--no-progress", action="store_true", help="local: no progress bar")
    p.add_argument("--out", required=True, help="directory to write the PNGs to (created if missing)")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("loadtest", help="send concurrent requests; print throughput, latency percentiles, A/B split",
                              description="Send REQUESTS generation requests, CONCURRENCY at a time, and print the "
                                          "throughput, p50/p95/p99 latency and the split per variant. Bounded: at "
                                          f"most {MAX_REQUESTS} requests, and nothing new is sent after --max-seconds.")
    _add_request_options(p, prompt_required=False)
    p.add_argument("--concurrency", type=_positive("--concurrency", MAX_CONCURRENCY), default=4,
                   help="requests in flight at once (default 4)")
    p.add_argument("--requests", type=_positive("--requests", MAX_REQUESTS), default=20, help="requests in all (default 20)")
    p.add_argument("--users", type=int, default=0,
                   help="cycle through this many user ids (sticky assignment); 0 sends none (default)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="send nothing new after this many seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    from quantserve.serve.ramp import add_ramp_arguments

    add_ramp_arguments(p)  # --ramp SCHEDULE [--mix MIX] [--duration] [--interval] [--csv] [--png]
    p.set_defaults(func=cmd_loadtest)

    p = subparsers.add_parser("ab", help="the A/B experiment of a running server: report, and rollout control",
                              description="Read a running quantserve's A/B experiment (`report`), and steer its "
                                          "progressive rollout by hand (`promote`, `rollback`, `pause`, `resume`).")
    ab = p.add_subparsers(dest="ab_command", required=True, metavar="COMMAND")
    r = ab.add_parser("report", help="per variant: requests, errors, latency with 95%% CIs, fidelity, feedback",
                      description="Fetch GET /v1/ab/report: per variant over a window, requests, error rate, p50/p95 "
                                  "latency with 95% bootstrap confidence intervals, images/s, model bytes, SSIM/PSNR "
                                  "against the reference variant, user feedback; and each candidate's p95 latency "
                                  "ratio against the baseline, with its interval.")
    r.add_argument("--url", default=DEFAULT_URL, help=f"quantserve's base URL (default {DEFAULT_URL})")
    r.add_argument("--window", help="e.g. 300s, 5m, 2h (default: since the Ingress replica started)")
    r.add_argument("--baseline", help="the variant to compare against (default: the shadow's reference, else the "
                                      "first variant)")
    r.add_argument("--api-key", help="sent as Authorization: Bearer (when the server has API keys)")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=cmd_ab_report)
    actions = {
        "promote": "give the candidate all of the baseline's traffic now (weight 1.0) and complete the rollout",
        "rollback": "send the candidate's traffic back to the baseline (weight 0) and stop the rollout",
        "pause": "hold the rollout at its current weight: no step is judged until `resume`",
        "resume": "go on from a pause; the step's window starts afresh",
    }
    for action, text in actions.items():
        a = ab.add_parser(action, help=text, description=f"POST /v1/ab/rollout {{\"action\": \"{action}\"}}: {text}. "
                                                          "Needs experiment.rollout in the serve config; answers "
                                                          "with the rollout's state.")
        a.add_argument("--url", default=DEFAULT_URL, help=f"quantserve's base URL (default {DEFAULT_URL})")
        a.add_argument("--api-key", help="sent as Authorization: Bearer (when the server has API keys)")
        a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
        a.add_argument("--json", action="store_true", help="print the rollout's state as JSON")
        a.set_defaults(func=cmd_ab_action)
