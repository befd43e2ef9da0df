#!/usr/bin/env bash
# The GPU check and benchmark suite: each benchmarks/gpu/bench_*_gpu.py script checks its kernels against
# a float64 reference on the GPU, times them, writes its files under $OUT (default ./gpu_out) and appends
# one section to $OUT/summary.md; this script prints that summary last.
#
#   bash benchmarks/gpu/run.sh            # on a machine with a CUDA GPU, torch and triton
#
# liger-kernel (the `compare` extra) is only a baseline: without it the Liger rows are skipped. On a
# machine that cannot download, put its wheel in the git-ignored .whl/ folder first, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# (a pure-Python wheel; it is installed beside the existing torch and triton, never over them).
# Without a GPU, a smoke run of the scripts: OUT=/tmp/gpu TRITON_INTERPRET=1 bash benchmarks/gpu/run.sh --smoke
#
# Other benchmarks: add ONE `bench ...` line below for your script. A script must exit non-zero when
# a check fails, write at most two files under $OUT (the device returns at most 8 in all) and append
# its section to "$ADASWITCH_GPU_SUMMARY".
set -uo pipefail
cd "$(dirname "$0")/../.."

export OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export ADASWITCH_GPU_SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1
: > "$ADASWITCH_GPU_SUMMARY"
PY="${PYTHON:-python3}"

# Wheels in .whl/ (liger-kernel): installed beside the existing packages, never over torch.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repository runs uninstalled: `adaswitch.kernels` is the top-level kernels/ folder (setup.py's
# package mapping), so link it into the package unless an install already provides it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import adaswitch.kernels" 2> /dev/null || ln -sfn ../kernels adaswitch/kernels

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/log.txt"

STATUS=0
bench() {  # bench SCRIPT [ARGS...]: run one benchmark script, log it, remember a failure
  echo "== $*" | tee -a "$OUT/log.txt"
  "$PY" "$@" 2>&1 | tee -a "$OUT/log.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "**FAILED** (exit $rc): $*" >> "$ADASWITCH_GPU_SUMMARY"
    STATUS=1
  fi
}

bench benchmarks/gpu/bench_divergence_gpu.py "$@"
bench benchmarks/gpu/bench_generate_gpu.py "$@"
bench benchmarks/gpu/bench_loss_gpu.py "$@"
bench benchmarks/gpu/bench_firstrun_gpu.py "$@"

echo
echo "================ summary ($OUT/summary.md) ================"
cat "$ADASWITCH_GPU_SUMMARY"
exit $STATUS
