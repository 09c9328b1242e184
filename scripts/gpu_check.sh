#!/usr/bin/env bash
# The GPU check: everything a session lent a GPU machine runs, as ONE command that ends within
# 8 minutes even when everything fails (benchmarks/NOTES.md, "The GPU check", says what to do
# with what comes back). Phases, each bounded with `timeout`, all bounded together by
# GPU_CHECK_SECONDS (default 460):
#   prerequisites  python, torch, triton, cmake, ninja, scikit-build-core, a C compiler (Triton
#                  compiles its launchers with it), nvcc, a GPU: what is missing is said first
#   build          pip install --no-build-isolation --no-deps -e . with the CUDA kernels for
#                  sm_90 (FASTVAE_CUDA_ARCHITECTURES=90, FASTVAE_ENABLE_CUDA=ON); if that fails,
#                  once more without CUDA, so that the Triton phases run all the same
#   smoke          scripts/gpu_smoke.py: every op x {triton, cuda} x 4 dtypes x 4 layouts,
#                  forward and backward, against the torch backend, bitwise run to run
#   graphs         scripts/gpu_graphs.py: fastvae train --cuda-graphs on the GPU: the noise of a
#                  graphed step (new per replay, the eager step's for the same seed), then the
#                  digits MLP, 2 epochs at batch 64, eager / --cuda-graphs / eager: each epoch's
#                  seconds and the final metrics (in check.log, lines "graphs: ...")
#   tests          the GPU-relevant tests (-k "triton or cuda or gpu": the tests parametrized
#                  over those backends and the gpu-marked ones), no --maxfail, SIGINT at the
#                  bound so that the summary and junit.xml are still written
#   bench          fastvae bench: the loss head, the DMoL and continuous Bernoulli likelihoods,
#                  then one op of each other family, at each op's GPU sizes (up to 64 Mi
#                  elements; DMoL 16x3x256x256), fwd+bwd, float32, against eager and
#                  torch.compile; results written after each case
#   bench-vq       fastvae bench --ops vq: the vector quantizer against vector-quantize-pytorch
#                  and cdist + argmin at the GPU sizes (its table in bench.log)
#   bench-tokenizers  fastvae bench --ops lfq,fsq,rvq: the tokenizer quantizers (LFQ, FSQ,
#                  residual VQ) against vector-quantize-pytorch eager and compiled at the GPU
#                  sizes, time and peak memory (or the package's out-of-memory error; in bench.log)
# Everything lands in $OUT (at most 8 files, 2 levels): check.log (this script's output, the
# build's included), smoke.txt, tests.log, junit.xml, bench.log, results/results.{json,csv}
# and results/roofline.png. The summary is printed last. Exit status 0 when every phase is ok.
#
#   bash scripts/gpu_check.sh              # on the GPU machine (the device tool's one call)
#   bash scripts/gpu_check.sh --dry-run    # here: Triton's interpreter, tiny sizes, 1-2 minutes
#                                          # (its bounds are loose: a slow CI machine passes too)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT="${OUT:-/tmp/fastvae-gpu-check}"
mkdir -p "$OUT"
rm -rf "${OUT:?}/results"
exec > >(tee "$OUT/check.log") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export FASTVAE_CUDA_ARCHITECTURES=90 FASTVAE_ENABLE_CUDA=ON
if [ $DRY = 1 ]; then
    PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
    export TRITON_INTERPRET=1
    TOTAL="${GPU_CHECK_SECONDS:-300}"
else
    PY="${PYTHON:-python3}"
    TOTAL="${GPU_CHECK_SECONDS:-460}"
    export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-8}"
fi
START=$SECONDS
declare -a NAMES=() RESULTS=()

# bound WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for what follows.
bound() {
    local left=$((TOTAL - (SECONDS - START) - $2))
    echo $(( left < $1 ? left : $1 ))
}

# phase NAME SECONDS COMMAND...: run it under `timeout` (SIGINT at the bound, SIGKILL 15 s
# later) and record ok / failed (exit status) / timed out / skipped.
phase() {
    local name=$1 limit=$2 t0=$SECONDS code result
    shift 2
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped (no time left)"
        NAMES+=("$name"); RESULTS+=("skipped (no time left)")
        return 1
    fi
    echo "== $name (at most ${limit}s): $*"
    timeout -s INT -k 15 "$limit" "$@"
    code=$?
    case $code in
        0) result=ok ;;
        124|137) result="timed out after ${limit}s" ;;
        *) result="failed (exit $code)" ;;
    esac
    result="$result, $((SECONDS - t0))s"
    echo "== $name: $result"
    NAMES+=("$name"); RESULTS+=("$result")
    [ $code -eq 0 ]
}

# ---- prerequisites ------------------------------------------------------------------------
echo "== fastvae GPU check$([ $DRY = 1 ] && echo ' (dry run)'), $(date -u '+%Y-%m-%d %H:%M UTC'), out: $OUT"
missing=()
have() { command -v "$1" > /dev/null 2>&1; }
pymod() { "$PY" -c "import $1" > /dev/null 2>&1; }
have "$PY" || missing+=("python ($PY)")
pymod torch || missing+=("torch (python module)")
pymod triton || missing+=("triton (python module)")
have "${CC:-cc}" || have gcc || have clang || missing+=("a C compiler (cc, gcc or clang; Triton builds its launchers with it)")
build_tools=()  # what the build needs (not a dry run, which uses the existing install)
have cmake || pymod cmake || build_tools+=("cmake")
have ninja || pymod ninja || build_tools+=("ninja")
pymod scikit_build_core || build_tools+=("scikit-build-core (python module)")
if [ $DRY = 0 ]; then
    have nvcc || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || build_tools+=("nvcc (the CUDA backend cannot be built)")
    missing+=("${build_tools[@]}")
    have nvidia-smi && timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
        || missing+=("a GPU (nvidia-smi)")
    timeout 60 "$PY" -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1 \
        || missing+=("a GPU torch can use (torch.cuda.is_available() is False)")
    have nvcc || export PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin"
fi
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)" 2>&1
if [ ${#missing[@]} -gt 0 ]; then
    echo "== prerequisites: MISSING: $(IFS=";"; echo "${missing[*]}" | sed "s/;/; /g")"
    NAMES+=(prerequisites); RESULTS+=("missing: $(IFS=";"; echo "${missing[*]}" | sed "s/;/; /g")")
else
    note=""
    [ $DRY = 1 ] && [ ${#build_tools[@]} -gt 0 ] && note=" (absent, needed for the build only: ${build_tools[*]})"
    echo "== prerequisites: ok$note"
    NAMES+=(prerequisites); RESULTS+=("ok$note")
fi

# ---- build ----------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    echo "== build: skipped in a dry run (uses the existing install); on the GPU:"
    echo "   $PY -m pip install --no-build-isolation --no-deps -e .   (FASTVAE_CUDA_ARCHITECTURES=90)"
    NAMES+=(build); RESULTS+=("skipped (dry run)")
else
    # Without an install nothing runs (fastvae.kernels is mapped by it): a failed build is
    # retried without CUDA and without libfastvae_torch (built against this machine's torch:
    # the dispatcher's kernels), so that the Triton phases still run.
    if ! phase build "$(bound 140 280)" "$PY" -m pip install --no-build-isolation --no-deps -e .; then
        FASTVAE_ENABLE_CUDA=OFF FASTVAE_TORCH_OPS=OFF phase "build-no-cuda" "$(bound 80 280)" \
            "$PY" -m pip install --no-build-isolation --no-deps -e .
    fi
fi
timeout 30 "$PY" -m fastvae info 2>&1 | head -40

# ---- smoke ----------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    phase smoke "$(bound 120 120)" "$PY" scripts/gpu_smoke.py --dry-run --budget 90 --out "$OUT/smoke.txt" > /dev/null
else
    phase smoke "$(bound 70 210)" "$PY" scripts/gpu_smoke.py --budget 55 --out "$OUT/smoke.txt" > /dev/null
fi

# ---- graphs ---------------------------------------------------------------------------------
# The training step captured as a CUDA graph (TrainConfig.cuda_graphs): its lines go to check.log
# and to a file outside $OUT (its 8 files are taken) that the summary reads.
GRAPHS_TXT="${TMPDIR:-/tmp}/fastvae-gpu-check-graphs.txt"
rm -f "$GRAPHS_TXT"
if [ $DRY = 1 ]; then
    phase graphs "$(bound 60 90)" "$PY" scripts/gpu_graphs.py --dry-run --out "$GRAPHS_TXT"
else
    phase graphs "$(bound 90 180)" "$PY" scripts/gpu_graphs.py --out "$GRAPHS_TXT"
fi

# ---- tests ----------------------------------------------------------------------------------
SELECT="triton or cuda or gpu"
XDIST=()
if [ $DRY = 1 ]; then
    SELECT="($SELECT) and iwae and float32"
    TESTS_LIMIT=$(bound 90 30)
else
    "$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 8)
    TESTS_LIMIT=$(bound 130 90)
fi
phase tests "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rfE -W ignore::RuntimeWarning \
    "${XDIST[@]}" -k "$SELECT" --junitxml="$OUT/junit.xml" tests > "$OUT/tests.log" 2>&1

# ---- bench ----------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    BENCH=(--device cpu --ops loss_head,bernoulli_nll --sizes 64x784 --no-compile
           --backends cpu,triton,torch)
else
    # each op's GPU sizes: 64x784, 4096x784, 65536x1024 (64 Mi elements); the likelihoods of
    # images at 16x3x32x32 and 8x3x64x64, then 1024x65536 (continuous Bernoulli) and
    # 16x3x256x256 with 10 mixtures (DMoL, 105 M parameter elements)
    BENCH=(--ops loss_head,dmol_nll,continuous_bernoulli_nll,bernoulli_nll,sample_and_kl,reparameterize,gaussian_kl,gaussian_nll)
fi
# bench-vq and bench-tokenizers (below) keep BENCH_VQ_RESERVE + BENCH_TOK_RESERVE seconds
if [ $DRY = 1 ]; then BENCH_LIMIT=150 BENCH_VQ_RESERVE=20 BENCH_VQ_LIMIT=60 BENCH_TOK_RESERVE=30 BENCH_TOK_LIMIT=90
else BENCH_LIMIT=120 BENCH_VQ_RESERVE=40 BENCH_VQ_LIMIT=100 BENCH_TOK_RESERVE=40 BENCH_TOK_LIMIT=120; fi
phase bench "$(bound $BENCH_LIMIT $((BENCH_VQ_RESERVE + BENCH_TOK_RESERVE)))" "$PY" -m fastvae bench "${BENCH[@]}" --directions fwd+bwd \
    --dtypes float32 --no-train-step --out "$OUT/results" > "$OUT/bench.log" 2>&1

# ---- bench-vq -------------------------------------------------------------------------------
# The vector quantizer against vector-quantize-pytorch (eager, compiled) and cdist + argmin at
# the GPU sizes (bench.VQ_SIZES["cuda"]: up to 131072 x 16384 x 8 and 32768 x 16384 x 256),
# fwd+bwd with a fixed codebook, time and the CUDA allocator's peak. Its table is appended to
# bench.log (the files of $OUT stay 8: vq.txt/json/csv go to a folder that does not come back).
# vector-quantize-pytorch (and einx) are not in the GPU image: carry their wheels, else its
# rows are reported as failed and cdist and fastvae still run.
if [ $DRY = 1 ]; then
    VQ=(--device cpu --vq-sizes 64x32x8 --vq-rounds 1 --no-compile --no-memory)
else
    VQ=(--vq-rounds 3)
fi
phase bench-vq "$(bound $BENCH_VQ_LIMIT $BENCH_TOK_RESERVE)" "$PY" -m fastvae bench --ops vq "${VQ[@]}" \
    --out "${TMPDIR:-/tmp}/fastvae-gpu-check-vq" >> "$OUT/bench.log" 2>&1

# ---- bench-tokenizers -----------------------------------------------------------------------
# LFQ, FSQ and residual VQ (fastvae's drop-ins) against vector-quantize-pytorch eager and
# compiled at the GPU sizes (bench_quantizers.QUANTIZERS[op].sizes["cuda"]; LFQ first: its
# package runs the N x 2^d softmax, which at d = 18 may not fit), fwd+bwd with frozen codebooks,
# time and the CUDA allocator's peak, or the error the package raised. Its tables (a summary per
# size, then every implementation) are appended to bench.log; lfq/fsq/rvq.txt/json/csv go to a
# folder that does not come back. Without the package its rows are failed and fastvae's run.
if [ $DRY = 1 ]; then
    TOK=(--device cpu --lfq-sizes 64x4 --fsq-sizes '64x[8,5,5]' --rvq-sizes 64x2x16x4
         --quantizer-rounds 1 --no-compile --no-memory)
else
    TOK=(--quantizer-rounds 3)
fi
phase bench-tokenizers "$(bound $BENCH_TOK_LIMIT 5)" "$PY" -m fastvae bench --ops lfq,fsq,rvq "${TOK[@]}" \
    --out "${TMPDIR:-/tmp}/fastvae-gpu-check-tokenizers" >> "$OUT/bench.log" 2>&1

# ---- summary --------------------------------------------------------------------------------
echo
echo "==================== summary ($((SECONDS - START))s) ===================="
status=0
for i in "${!NAMES[@]}"; do
    printf '%-17s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"
    case "${RESULTS[$i]}" in ok*|skipped\ \(dry*) ;; *) status=1 ;; esac
done
echo "-- smoke:"
[ -f "$OUT/smoke.txt" ] && { grep '^FAIL' "$OUT/smoke.txt" | head -8; tail -1 "$OUT/smoke.txt"; }
echo "-- graphs (fastvae train --cuda-graphs):"
[ -f "$GRAPHS_TXT" ] && grep -E 'FAIL|train last epoch|graphs: (ok|FAILED)$' "$GRAPHS_TXT" | head -8
echo "-- tests:"
if [ -f "$OUT/tests.log" ]; then
    grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -12
    grep -E '(passed|failed|error|no tests ran|interrupted)' "$OUT/tests.log" | tail -2
fi
echo "-- bench (x eager, x compile):"
if [ -f "$OUT/bench.log" ]; then
    grep -E 'copy bandwidth|failed' "$OUT/bench.log" | head -6
    grep -E '^loss_head ' "$OUT/bench.log"
    grep -E '^[a-z_]+ +fwd\+bwd fastvae:' "$OUT/bench.log" | grep -v '^loss_head'
    grep -E '^(fastvae|vqp|cdist)[a-z:_]* +[0-9]+x[0-9[]' "$OUT/bench.log"
    tail -1 "$OUT/bench.log" | grep -E 'Error|wrote'
fi
echo "-- files in $OUT:"
(cd "$OUT" && find . -type f | sort | sed 's|^\./|   |')
exec 1>&- 2>&-
wait "$TEE_PID" 2> /dev/null
exit $status
