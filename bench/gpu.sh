#!/usr/bin/env bash
# Every scenario of the benchmark on a CUDA device, in one run of at most about 8 minutes.
#
# On a machine with network and this repo's .venv, first: bash bench/gpu_prepare.sh
# (wheels for what the GPU image lacks into .whl/, wrk into .deb/). Then, on the GPU machine, from
# the repository root, with .whl and .deb carried along:
#
#     bash bench/gpu.sh                 # or: bash bench/gpu.sh --duration 4   (extra `python -m bench` options)
#
# It installs the carried wheels into /tmp/site (nothing into the image), unpacks wrk into
# /tmp/wrkroot (else the Python load generator is used), checks that torch sees CUDA, runs
# `python -m bench.cuda_check` (traced and CUDA-graph passes against eager, one-row latency), then
# `python -m bench --device cuda` (servers on the GPU with FLOWSERVE_DEVICE=cuda, model limits on the
# GPU) and writes bench/results/<date>-cuda.{json,md,png}; partial results are written after each
# phase, so a run cut short still leaves figures. With $OUT set (the device tool), they are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LIMIT_S=${BENCH_GPU_LIMIT_S:-480}
DEVICE=${BENCH_DEVICE:-cuda}   # BENCH_DEVICE=cpu: a dry run of this script on a machine without a GPU

RESULTS=${BENCH_RESULTS:-bench/results}
README=${BENCH_README:-bench/README.md}

if ! $PY -c "import zuko, fastapi, uvicorn, orjson, pydantic_settings, httptools" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # `python -m service` and `python -m bench` from this tree

if ! command -v wrk >/dev/null 2>&1 && ls .deb/*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/wrkroot
  for f in .deb/*.deb; do dpkg -x "$f" /tmp/wrkroot; done
  if LD_LIBRARY_PATH=/tmp/wrkroot/usr/lib/x86_64-linux-gnu /tmp/wrkroot/usr/bin/wrk --version 2>&1 | grep -q Glozer; then
    export PATH=/tmp/wrkroot/usr/bin:$PATH
    export LD_LIBRARY_PATH=/tmp/wrkroot/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    echo "gpu.sh: the carried wrk does not run here; the Python load generator is used"
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - "$DEVICE" <<'PYEOF' || { echo "gpu.sh: the Python stack is incomplete or torch does not see $DEVICE"; exit 2; }
import sys
import torch, zuko, fastapi, uvicorn, orjson, pydantic_settings  # noqa: F401 - everything the servers import
if sys.argv[1] != "cpu":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF

STEM="$(date +%F)-$DEVICE"
if [ "$DEVICE" != cpu ]; then  # the CUDA path's own checks first: traces, CUDA graphs, one-row latency
  $PY -m bench.cuda_check --out "$RESULTS/$STEM-check.json" || echo "gpu.sh: bench.cuda_check reported a failure (see above)"
fi
timeout --signal=TERM --kill-after=30 "$LIMIT_S" \
  $PY -m bench --device "$DEVICE" --duration 5 --name "$STEM" --out "$RESULTS" --readme "$README" "$@"
rc=$?
[ $rc -eq 0 ] || echo "gpu.sh: python -m bench exited $rc (partial results, if any, are in $RESULTS/$STEM.json)"
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS/$STEM".* "$RESULTS/$STEM"-check.json "$OUT"/ 2>/dev/null || true
  cp "$README" "$OUT"/README-bench.md 2>/dev/null || true
fi
exit $rc
