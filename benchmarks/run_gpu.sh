#!/usr/bin/env bash
# der_fast on a CUDA machine, in one run of under 8 minutes: install, the gpu-marked tests, the
# frozen-plan chooser's table, and the stage-1 / stage-2 / inference ratios against the eager
# reference and torch.compile of the reference. Everything goes to one folder:
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]        (default OUT_DIR: bench_gpu/)
#
#   env.txt            nvidia-smi, torch / CUDA versions, `python -m der_fast.info`
#   install.log        pip install of this checkout (built for the visible GPU)
#   tests_gpu.log      pytest -m gpu tests/ (graph replay vs eager, CUDA head, Triton gating)
#   chooser.md/.json   per backbone, density (100 %, 30 %), t = 1 5 10, batch 128: the
#                      timings the chooser picked from (benchmarks/chooser_table.py)
#   <workload>_<backbone>.md/.json   benchmarks/scaling.py, batch 128, density 30 %:
#                      stage1 at t = 10 (reference, compile, fast; compile for ResNet-32
#                      only unless COMPILE_R18=1), stage2 and infer at t = 1 5 10
#                      (reference, fast_loop, fast)
#   stage1_amp/        benchmarks/stage1_step.py --device cuda --bf16 --fp16, t = 1 5: one
#                      stage-1 step in float32, bf16 and fp16 autocast (reference and fast)
#   summary.txt        each step's exit status and seconds
#
# Environment: SKIP_INSTALL=1 reuses an installed der_fast; ROUNDS (default 5) timed rounds
# per scaling row; COMPILE_R18=1 also times torch.compile for ResNet-18-CIFAR (adds minutes);
# DER_FAST_CUDA_ARCHS overrides the build's architectures; BUDGET_S (default 460) bounds the
# whole run. Each step has a time limit (seconds, below, cut to what is left of BUDGET_S) so a
# slow one cannot take the whole run; a step that fails, runs out or finds no time left is
# recorded in summary.txt and the run goes on. The full pytest-benchmark suite is separate:
# DER_FAST_BENCH_DEVICE=cuda pytest benchmarks --benchmark-only (see benchmarks/RESULTS.md).
#
# Timing on CUDA: scaling.py and chooser_table.py synchronize before reading the clock.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/bench_gpu}" && cd "${1:-$ROOT/bench_gpu}" && pwd)"
PY="${PYTHON:-python}"
ROUNDS="${ROUNDS:-5}"
BUDGET_S="${BUDGET_S:-460}"
export DER_FAST_BENCH_DEVICE=cuda
START=$SECONDS
: > "$OUT/summary.txt"

# step NAME LIMIT_S LOG CMD...: run CMD from OUT with a time limit, log to LOG, note the result
step() {
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc left
    shift 3
    left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        echo "$name: exit skipped (budget of ${BUDGET_S}s spent)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s, $((SECONDS - START))s so far)"
    (cd "$OUT" && timeout --kill-after=10 "$limit" "$@") > "$OUT/$log" 2>&1
    rc=$?
    tail -n 5 "$OUT/$log"
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    return 0
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: no CUDA device visible to torch" >&2
    exit 1
fi

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    # --no-build-isolation: build against the torch already installed (no network needed);
    # with a GPU visible the CUDA kernels are compiled for its architecture only
    step install 240 install.log env DER_FAST_BUILD_CUDA="${DER_FAST_BUILD_CUDA:-1}" \
        "$PY" -m pip install --no-build-isolation --no-deps "$ROOT"
fi

# From OUT with -P (no cwd on sys.path): `import der_fast` is the installed package with its
# compiled kernels, not the source tree.
step env 30 env.txt bash -c "nvidia-smi; date -u; \"$PY\" -P -c 'import torch, der_fast; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \
torch.cuda.get_device_capability(0)); print(\"der_fast\", der_fast.__version__, der_fast.__file__)'; \
\"$PY\" -P -m der_fast.info --check"

# the tests import their helpers from tests/; der_fast itself resolves to the installed copy
step tests_gpu 90 tests_gpu.log "$PY" -P -m pytest "$ROOT/tests" --rootdir "$ROOT" \
    -p no:cacheprovider -m gpu -q -ra

step chooser 90 chooser_stderr.log "$PY" -P "$ROOT/benchmarks/chooser_table.py" \
    --device cuda --batch 128 --ts 1 5 10 --out chooser.md --json chooser.json

scaling() {  # scaling WORKLOAD BACKBONE PROVIDERS LIMIT TS...
    local w=$1 b=$2 p=$3 limit=$4
    shift 4
    step "${w}_${b}" "$limit" "${w}_${b}.log" "$PY" -P "$ROOT/benchmarks/scaling.py" \
        --device cuda --workload "$w" --backbone "$b" --batch 128 --density 0.3 \
        --rounds "$ROUNDS" --providers "$p" --ts "$@" --out "${w}_${b}.md" --json "${w}_${b}.json"
}
scaling stage1 resnet32 reference,compile,fast 150 10
if [ "${COMPILE_R18:-0}" = "1" ]; then
    scaling stage1 resnet18_cifar reference,compile,fast 240 10
else
    scaling stage1 resnet18_cifar reference,fast 45 10
fi
# mixed precision: one budgeted stage-1 step (soft masks, then pruned at the budget) in
# float32, bfloat16 and float16 autocast (float16 with the trainer's GradScaler)
step stage1_amp 90 stage1_amp.log "$PY" -P "$ROOT/benchmarks/stage1_step.py" --device cuda \
    --t 1 5 --bf16 --fp16 --rounds "$ROUNDS" --out "$OUT/stage1_amp"
for w in stage2 infer; do
    for b in resnet32 resnet18_cifar; do
        scaling "$w" "$b" reference,fast_loop,fast 40 1 5 10
    done
done

echo "total $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"
echo "results in $OUT"
! grep -v ": exit 0," "$OUT/summary.txt" | grep -q "exit"
