#!/usr/bin/env bash
# The one prepared GPU check (written for the lent H200; any CUDA machine works):
#   1. the whole test suite on the GPU        (python3 -m pytest -q, at most TEST_TIMEOUT s; no -x: one
#      failing test must not cost the perf steps their evidence)
#   2. the 'quick' perf suite -> CSV, summary, PNGs               (at most PERF_TIMEOUT s)
#   3. a short tune of ResNet-50 batch 64 -> the first real tuning file   (at most TUNE_TIMEOUT s)
#   2b. the cooperative path on (TRITON_BN_COOPERATIVE=1): its tests (the GPU one first) and the
#       kernel tests, then the quick suite again -> results/cooperative/ (at most 60 + 90 s)
#   4. a short whole-model run: python -m perf model, batch 64, bf16 channels-last, eager /
#      convert_model / fuse_model, 5 timed steps                  (at most MODEL_TIMEOUT s)
# With the default timeouts: 150 + 150 + 60 + 90 + 60 + 60 s, plus 10 s of grace each for
# `timeout -k` = 630 s at worst: over a 10-minute device call, so pass SKIP_MODEL=1 (step 4) there
# (COOP_TEST_TIMEOUT=1 COOP_PERF_TIMEOUT=1 all but skip 2b), and a few seconds of version
# queries and tar (the quick suite:
# 10 cases, 3 of ResNet-50's shapes at batch 256 among them, the masked speech case last;
# test_perf.py keeps it at most 10).
# Installs nothing (the device machine has no network); without matplotlib the perf run still
# writes the CSV and summary, just no PNGs.
#
# Usage, from the repository root:   OUT=/some/dir bash perf/gpu_check.sh
# Under $OUT (at most 8 files come back from the device tool, so the PNGs travel in a tarball):
#   versions.txt  GPU name, driver, torch, triton, matplotlib     pytest.log, perf.log
#   <suite>-<gpu>.csv, <suite>-<gpu>-summary.txt                  results.tar.gz (CSV, summary, PNGs)
#   tuning-resnet50-b64.json (the tune writes it after every shape: a timeout keeps what was done)
#   results.tar.gz also holds model/ (perf model: CSV, PNG, log) and tune.log, tuning plots
#   status.txt    exit codes of the three steps
# The perf harness rewrites its CSV after every case, so a timeout still leaves the cases done.
set -u
OUT=${OUT:-$PWD/out/gpu_check}
PY=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
PERF_TIMEOUT=${PERF_TIMEOUT:-150}
TUNE_TIMEOUT=${TUNE_TIMEOUT:-60}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-60}
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

timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

timeout -k 10 "$PERF_TIMEOUT" "$PY" -m perf --suite quick --out "$OUT/results" 2>&1 | tee "$OUT/perf.log"
perf_rc=${PIPESTATUS[0]}

# 2b. The cooperative path (issue 21, perf/NOTES.md 2026-12-08), switch on: its GPU tests (the
#     one-launch grid barrier, CUDA graphs) and the kernel/on-chip tests, then the quick suite,
#     against step 2's run with it off (its own CSV under results/cooperative/).
COOP_TEST_TIMEOUT=${COOP_TEST_TIMEOUT:-60}
COOP_PERF_TIMEOUT=${COOP_PERF_TIMEOUT:-90}
mkdir -p "$OUT/results/cooperative"
TRITON_BN_COOPERATIVE=1 timeout -k 10 "$COOP_TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_cooperative.py tests/test_onchip.py tests/test_kernels.py 2>&1 | tail -40 \
  > "$OUT/results/cooperative/pytest.log"
coop_test_rc=${PIPESTATUS[0]}
TRITON_BN_COOPERATIVE=1 timeout -k 10 "$COOP_PERF_TIMEOUT" "$PY" -m perf --suite quick \
  --out "$OUT/results/cooperative" > "$OUT/results/cooperative/perf.log" 2>&1
coop_perf_rc=$?

# 3. The tuning file (fp32 NCHW ResNet-50 at batch 64): winners and every candidate's time.
timeout -k 10 "$TUNE_TIMEOUT" "$PY" -m triton_bn.tune --model resnet50 --batch 64 \
  --out "$OUT/results/tuning-resnet50-b64.json" 2>&1 | tr '\r' '\n' > "$OUT/results/tune.log"
tune_rc=${PIPESTATUS[0]}
"$PY" -m triton_bn.tune --plot "$OUT/results/tuning-resnet50-b64.json" --plot-dir "$OUT/results" \
  >> "$OUT/results/tune.log" 2>&1
cp "$OUT/results/tuning-resnet50-b64.json" "$OUT/" 2>/dev/null

# 4. A whole-model training step; its CSV, PNG and log travel in the tarball.
model_rc=0
if [ "${SKIP_MODEL:-0}" != 1 ]; then
  mkdir -p "$OUT/results/model"
  timeout -k 10 "$MODEL_TIMEOUT" "$PY" -m perf model --batches 64 --precisions bf16_cl --steps 5 \
    --configs torch_eager,triton_convert,triton_fuse --out "$OUT/results/model" > "$OUT/results/model/model.log" 2>&1
  model_rc=$?
fi

cp "$OUT"/results/*.csv "$OUT"/results/*-summary.txt "$OUT"/ 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
echo "pytest rc=$test_rc (124: timed out); perf rc=$perf_rc (1: error rows, 124: timed out);" \
  "tune rc=$tune_rc; model rc=$model_rc; cooperative: pytest rc=$coop_test_rc, perf rc=$coop_perf_rc" \
  | tee "$OUT/status.txt"
[ "$test_rc" -eq 0 ] && [ "$perf_rc" -eq 0 ] && [ "$model_rc" -eq 0 ]
