#!/usr/bin/env bash
# The one prepared GPU check (written for the lent H200; any CUDA machine works):
#   1. the whole test suite on the GPU        (python3 -m pytest -x -q, at most TEST_TIMEOUT s)
#   2. the 'quick' perf suite -> CSV, summary, PNGs               (at most PERF_TIMEOUT s)
#   3. a short whole-model run: python -m perf model, batch 64, bf16 channels-last, eager /
#      convert_model / fuse_model, 5 timed steps                  (at most MODEL_TIMEOUT s)
# Under 10 minutes with the default timeouts: 210 + 240 + 120 s, plus 10 s of grace each for
# `timeout -k` = 600 s at worst (SKIP_MODEL=1 skips step 3: 470 s), and a few seconds of
# version queries and tar (the quick suite:
# 9 cases, 3 of ResNet-50's shapes at batch 256 among them; test_perf.py keeps it at most 10).
# Installs nothing (the device machine has no network); without matplotlib the perf run still
# writes the CSV and summary, just no PNGs.
#
# Usage, from the repository root:   OUT=/some/dir bash perf/gpu_check.sh
# Under $OUT (at most 8 files come back from the device tool, so the PNGs travel in a tarball):
#   versions.txt  GPU name, driver, torch, triton, matplotlib     pytest.log, perf.log
#   <suite>-<gpu>.csv, <suite>-<gpu>-summary.txt                  results.tar.gz (CSV, summary, PNGs)
#   status.txt    exit codes of both steps
# The perf harness rewrites its CSV after every case, so a timeout still leaves the cases done.
set -u
OUT=${OUT:-$PWD/out/gpu_check}
PY=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-210}
PERF_TIMEOUT=${PERF_TIMEOUT:-240}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-120}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # triton_bn and perf from this checkout, uninstalled
mkdir -p "$OUT/results"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: failed"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  "$PY" -c "import matplotlib; print('matplotlib', matplotlib.__version__)" 2>/dev/null || echo "matplotlib: missing (CSV only)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: this script is for the GPU machine (on a CPU, run: python -m perf)" | tee "$OUT/status.txt"
  exit 2
fi

timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -x -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

timeout -k 10 "$PERF_TIMEOUT" "$PY" -m perf --suite quick --out "$OUT/results" 2>&1 | tee "$OUT/perf.log"
perf_rc=${PIPESTATUS[0]}

model_rc=0
if [ "${SKIP_MODEL:-0}" != 1 ]; then
  timeout -k 10 "$MODEL_TIMEOUT" "$PY" -m perf model --batches 64 --precisions bf16_cl --steps 5 \
    --configs torch_eager,triton_convert,triton_fuse --out "$OUT/results" 2>&1 | tee "$OUT/model.log"
  model_rc=${PIPESTATUS[0]}
fi

cp "$OUT"/results/*.csv "$OUT"/results/*-summary.txt "$OUT"/ 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
echo "pytest rc=$test_rc (124: timed out); perf rc=$perf_rc (1: error rows, 124: timed out); model rc=$model_rc" | tee "$OUT/status.txt"
[ "$test_rc" -eq 0 ] && [ "$perf_rc" -eq 0 ] && [ "$model_rc" -eq 0 ]
