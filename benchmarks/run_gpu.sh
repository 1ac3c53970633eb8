#!/usr/bin/env bash
# The der_fast benchmark suite on a CUDA machine: install, run, write the JSON and the report.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR [extra pytest args...]]   (default OUT_DIR: bench_gpu/)
#
# Environment (see benchmarks/harness/env.py): DER_FAST_BENCH=full (default here) | quick | smoke,
# DER_FAST_BENCH_COMPILE=small (default here: torch.compile for t <= 2; all | quick | none),
# DER_FAST_BENCH_PROVIDERS=..., DER_FAST_BENCH_ROUNDS=N, DER_FAST_CUDA_ARCHS (build, default
# 9.0), SKIP_INSTALL=1 to reuse an existing install, SCALING=0 to skip the scaling table.
#
# Where one command may run at most ~10 minutes, split the grid with pytest's -k and merge:
#   bash benchmarks/run_gpu.sh bench_gpu/r32 -k "test_model and resnet32"
#   SKIP_INSTALL=1 SCALING=0 bash benchmarks/run_gpu.sh bench_gpu/r18 -k "test_model and resnet18"
#   python -m der_fast.bench_report bench_gpu/r32/bench_gpu.json bench_gpu/r18/bench_gpu.json
#
# Timing on CUDA: every timed call ends with torch.cuda.synchronize() (harness Workload.step),
# so pytest-benchmark's wall-clock timer measures finished GPU work. Peak memory there is
# torch.cuda.max_memory_allocated() over one call (minus what was allocated before it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/bench_gpu}" && cd "${1:-$ROOT/bench_gpu}" && pwd)"
shift || true
PY="${PYTHON:-python}"
export DER_FAST_BENCH="${DER_FAST_BENCH:-full}"
export DER_FAST_BENCH_COMPILE="${DER_FAST_BENCH_COMPILE:-small}"
export DER_FAST_BENCH_DEVICE=cuda

"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO GPU'); sys.exit(0 if ok else 1)"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    # --no-build-isolation: build against the torch already installed (and no network needed)
    DER_FAST_BUILD_CUDA="${DER_FAST_BUILD_CUDA:-auto}" \
        "$PY" -m pip install --no-build-isolation --no-deps "$ROOT" 2>&1 | tail -n 20
fi

# Run from OUT with -P (no cwd on sys.path) and --import-mode=importlib, so `import der_fast`
# is the installed package with its compiled kernels, not the source tree; the suite finds its
# own helpers (benchmarks/harness/) by path. The JSON records which der_fast it imported.
cd "$OUT"
"$PY" -P -c "import der_fast; print('der_fast', der_fast.__version__, 'from', der_fast.__file__)"
"$PY" -P -m der_fast.info 2>/dev/null || true

set +e
"$PY" -P -m pytest "$ROOT/benchmarks" --rootdir "$ROOT" --import-mode=importlib \
    -p no:cacheprovider --benchmark-only --benchmark-json "$OUT/bench_gpu.json" \
    --benchmark-columns=median,iqr,min,rounds -ra "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
set -e

if [ -f "$OUT/bench_gpu.json" ]; then
    "$PY" -P -m der_fast.bench_report "$OUT/bench_gpu.json" --out "$OUT/report_gpu.md"
fi
if [ "${SCALING:-1}" != "0" ]; then
    "$PY" -P "$ROOT/benchmarks/scaling.py" --device cuda --batch 128 --rounds 10 \
        --ts 1 2 5 10 15 20 --out "$OUT/scaling_gpu.md" --json "$OUT/scaling_gpu.json" || true
fi
echo "results in $OUT (bench_gpu.json, report_gpu.md, scaling_gpu.md, pytest.log)"
exit "$status"
