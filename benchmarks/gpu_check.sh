#!/usr/bin/env bash
# The prepared GPU check of issue 19, for a short rental of one H100 (each step well under 10 minutes):
#   1. installs the wheels that travel with the checkout in .whl/ (if any) into a private site directory;
#   2. prints the GPU, torch, Triton and which backends import;
#   3. runs the Triton kernel tests on CUDA (tests/kernels/test_triton_kernels.py);
#   4. runs the kernel benchmark (benchmarks/kernels_gpu.py) at the FLUX shapes (3072x3072, 12288x3072; M = 1, 16, 256,
#      4096) against cuBLAS bf16 and, where the backend is installed, its own kernel, for every scheme whose backend
#      imports there;
#   5. prints the rows for benchmarks/RESULTS.md with the GPU's name (and writes them under $OUT when set);
#   6. fills a fresh Triton cache for this GPU's target without touching the GPU (quantserve.kernels.prefill),
#      then launches the same kernels on the GPU and counts the compiles it still had to make (0 expected).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --rehearse   # here, no GPU: TRITON_INTERPRET=1, tiny shapes (CI runs this)
#
# Environment: PYTHON (default python3), GPU_CHECK_SCHEMES (comma-separated; default below), GPU_CHECK_M,
# GPU_CHECK_SHAPES, GPU_CHECK_REP_MS (do_bench ms per measurement, default 25), GPU_CHECK_TEST_TIMEOUT (s, 240),
# GPU_CHECK_BENCH_TIMEOUT (s, 330), OUT (a folder for kernels_gpu.md, results_rows.md, the logs).
# Wheels: the GPU machine has torch, Triton, pytest, tqdm but none of Ray, diffusers or bitsandbytes. Pure-Python
# backends can travel (64 MiB in all): here, `echo /.whl/ >> .git/info/exclude` and
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gguf torchao
# then carry .whl. A scheme whose backend does not import is left out of the benchmark and named.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
REHEARSE=0
case "${1:-}" in
  --rehearse) REHEARSE=1 ;;
  "") ;;
  -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument ${1}; accepted: --rehearse, --help" >&2; exit 2 ;;
esac
[ "${GPU_CHECK_REHEARSE:-0}" = 1 ] && REHEARSE=1
OUT_DIR=${OUT:-}
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR"
STATUS=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qs-site .whl/*.whl \
    || { echo "gpu_check: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/qs-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ wheels: using what is installed"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$REHEARSE" = 1 ]; then
  export TRITON_INTERPRET=1
  DEFAULT_SCHEMES="nf4,gguf-q4_k"
  TESTS_K="int8_rows_bnb or gguf_Q4_K"   # a few cases: the rehearsal proves the script, not the kernels
  BENCH_ARGS=(--smoke)
else
  DEFAULT_SCHEMES="nf4,fp4,llm-int8,int8wo,float8wo,int4wo,quanto-int4,gguf-q4_0,gguf-q8_0,gguf-q4_k,gguf-q6_k,modelopt-nvfp4"
  TESTS_K=""
  BENCH_ARGS=(--shapes "${GPU_CHECK_SHAPES:-3072x3072,12288x3072}" --m "${GPU_CHECK_M:-1,16,256,4096}"
              --rep-ms "${GPU_CHECK_REP_MS:-25}")
fi
SCHEMES=${GPU_CHECK_SCHEMES:-$DEFAULT_SCHEMES}

step "device"
DEVICE=$("$PY" - "$REHEARSE" <<'EOF'
import importlib.util, sys
import torch, triton
rehearse = sys.argv[1] == "1"
if not rehearse and not torch.cuda.is_available():
    print("no CUDA device (run with --rehearse on a CPU)", file=sys.stderr)
    sys.exit(3)
name = "CPU rehearsal (TRITON_INTERPRET=1)" if rehearse else torch.cuda.get_device_name(0)
cc = "" if rehearse else "sm_%d%d" % torch.cuda.get_device_capability(0)
have = {m: importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "torchao", "optimum", "gguf", "modelopt")}
print(f"{name} {cc}".strip())
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; backends: "
      + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()), file=sys.stderr)
EOF
) || { echo "gpu_check: the device check failed" >&2; exit 3; }
echo "GPU: $DEVICE"

step "Triton kernel tests"
TEST_ARGS=(-q -x -p no:cacheprovider tests/kernels/test_triton_kernels.py)
if [ -n "$TESTS_K" ]; then
  TEST_ARGS+=(-k "$TESTS_K")
elif ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  echo "bitsandbytes is not installed: its NF4/FP4 cases are deselected (their weights are built by bitsandbytes)"
  TEST_ARGS+=(-k "not nf4 and not fp4_block128")
fi
TEST_LOG=${OUT_DIR:+$OUT_DIR/tests.log}
timeout "${GPU_CHECK_TEST_TIMEOUT:-240}" "$PY" -m pytest "${TEST_ARGS[@]}" 2>&1 | tee "${TEST_LOG:-/dev/null}"
RC=${PIPESTATUS[0]}
echo "tests: exit $RC"
[ "$RC" = 0 ] || STATUS=1

step "schemes whose backend runs here"
AVAILABLE=$("$PY" - "$SCHEMES" "$REHEARSE" <<'EOF'
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("qs_bench_kernels", "benchmarks/kernels_gpu.py")
kb = sys.modules["qs_bench_kernels"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kb)
device = "cpu" if sys.argv[2] == "1" else "cuda"
ok = []
for scheme in [s for s in sys.argv[1].split(",") if s]:
    try:
        kb.build_weight(scheme, torch.randn(64, 256, dtype=torch.bfloat16, device=device))
        ok.append(scheme)
    except Exception as exc:
        print(f"  {scheme}: left out ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
              file=sys.stderr)
print(",".join(ok))
EOF
)
echo "benchmarked: ${AVAILABLE:-none}"

if [ -n "$AVAILABLE" ]; then
  step "kernel benchmark"
  TABLE=${OUT_DIR:-/tmp}/kernels_gpu.md
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-330}" "$PY" benchmarks/kernels_gpu.py --schemes "$AVAILABLE" "${BENCH_ARGS[@]}" \
    --out "$TABLE" > "${OUT_DIR:-/tmp}/bench.log" 2>&1
  RC=$?
  tail -n 5 "${OUT_DIR:-/tmp}/bench.log"
  echo "benchmark: exit $RC"
  [ "$RC" = 0 ] || STATUS=1
  if [ -s "$TABLE" ]; then
    step "RESULTS.md rows"
    ROWS=${OUT_DIR:-/tmp}/results_rows.md
    {
      echo "### Kernels on $DEVICE ($(date -u +%Y-%m-%d), benchmarks/gpu_check.sh)"
      echo
      cat "$TABLE"
    } > "$ROWS"
    cat "$ROWS"
  fi
else
  echo "gpu_check: no scheme's backend runs here; no benchmark" >&2
  STATUS=1
fi
step "Triton cache prefilled ahead of time, then found by the GPU"
PREFILL_CACHE=$(mktemp -d)
PREFILL_FORMATS=${GPU_CHECK_PREFILL_FORMATS:-int8_rows_bnb,gguf_Q4_K,float8_e4m3_rows}
if [ "$REHEARSE" = 1 ]; then
  PREFILL_TARGET=sm_90; PREFILL_M=1; PREFILL_FORMATS=int8_rows_bnb
else
  PREFILL_TARGET=${DEVICE##* }; PREFILL_M=1,16,4096
fi
env -u TRITON_INTERPRET TRITON_CACHE_DIR="$PREFILL_CACHE" timeout "${GPU_CHECK_PREFILL_TIMEOUT:-300}" \
  "$PY" -m quantserve.kernels.prefill --targets "$PREFILL_TARGET" --formats "$PREFILL_FORMATS" --m "$PREFILL_M" \
  --jobs "$(nproc)" --no-progress 2>&1 | grep -v -i warn
RC=${PIPESTATUS[0]}
BEFORE=$(ls "$PREFILL_CACHE" | wc -l)
echo "prefill: exit $RC, $BEFORE cache entries for $PREFILL_TARGET"
[ "$RC" = 0 ] || STATUS=1
if [ "$REHEARSE" = 0 ] && [ "$RC" = 0 ]; then
  TRITON_CACHE_DIR="$PREFILL_CACHE" timeout "${GPU_CHECK_PREFILL_TIMEOUT:-300}" "$PY" - "$PREFILL_FORMATS" "$PREFILL_M" <<'EOF'
import dataclasses, sys
import torch
from quantserve.kernels import aot, triton_dequant, triton_matmul
for fmt in sys.argv[1].split(","):
    packed = aot.packed_format(fmt, aot.FLUX_N)
    fields = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    packed = type(packed)(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
    n, k = packed.shape
    for m in map(int, sys.argv[2].split(",")):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        triton_matmul.linear(x, packed, torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    triton_dequant.dequantize(packed, torch.bfloat16)
torch.cuda.synchronize()
EOF
  RC=$?
  AFTER=$(ls "$PREFILL_CACHE" | wc -l)
  echo "GPU launches: exit $RC; compiles the GPU still made: $((AFTER - BEFORE)) (0: every launch found its prefilled compile)"
  [ "$RC" = 0 ] || STATUS=1
fi
rm -rf "$PREFILL_CACHE"

echo
echo "gpu_check: $([ "$STATUS" = 0 ] && echo OK || echo FAILED) on $DEVICE"

exit $STATUS
