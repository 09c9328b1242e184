#!/usr/bin/env bash
# The GPU work of a session that is lent a GPU machine (the device tool; see benchmarks/NOTES.md),
# in as few calls as possible: build fastvae against the machine's torch (CUDA part for sm_90),
# run the whole test suite there (Triton kernels on the GPU, the cuda backend, the gpu-marked
# tests), then `fastvae bench`. Logs and results go to $OUT (what the device tool brings back:
# at most 8 files), a short summary to stdout.
#
#   bash scripts/gpu_session.sh            # tests, then bench
#   bash scripts/gpu_session.sh tests      # PYTEST_ARGS="-n 4 -k cuda" to narrow or spread it
#   bash scripts/gpu_session.sh bench --ops loss_head --sizes 64x784,65536x1024
#
# Afterwards, on the development machine: copy $OUT/results/* to benchmarks/results/<device>/
# and commit them with the notes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fastvae-gpu}"
mkdir -p "$OUT"
what="${1:-all}"
[ $# -gt 0 ] && shift

export FASTVAE_CUDA_ARCHITECTURES="${FASTVAE_CUDA_ARCHITECTURES:-90}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} > "$OUT/device.txt" 2>&1

# Build once per machine (a warm machine keeps the editable install between calls).
if ! python -c "from fastvae.ops import native; assert native.unusable_reason('cuda') is None" \
        > /dev/null 2>&1; then
    if ! pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
        tail -30 "$OUT/install.log"
        exit 1
    fi
fi
fastvae info >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

status=0
if [[ $what == all || $what == tests ]]; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    python -m pytest -q -p no:cacheprovider --maxfail=50 -rfE ${PYTEST_ARGS:-} tests \
        > "$OUT/tests.log" 2>&1
    code=$?
    echo "tests: exit $code"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
    tail -3 "$OUT/tests.log"
    [ $code -eq 0 ] || status=$code
fi
if [[ $what == all || $what == bench ]]; then
    fastvae bench --out "$OUT/results" "$@" > "$OUT/bench.log" 2>&1
    code=$?
    echo "bench: exit $code"
    grep -E "loss_head|train step|copy bandwidth" "$OUT/bench.log" | tail -30
    [ $code -eq 0 ] || status=$code
fi
exit $status
