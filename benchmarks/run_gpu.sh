#!/usr/bin/env bash
# The GPU checks and figures, as one prepared run on a CUDA machine (the device tool's image: Python 3.12,
# torch + CUDA, no diffusers/fastapi/uvicorn/pydantic). Prepare here, once:
#   ../shared/tools/gpu-wheels.sh          # the missing wheels into .whl/ (git-ignored)
# then run it there with carry [".whl"]:   bash benchmarks/run_gpu.sh
# It installs the wheels offline, runs `pytest -m gpu`, `ktl bench server --device cuda` and
# `ktl bench generate --device cuda`, and leaves the logs and the updated docs/benchmarks.md in $OUT
# (or ./gpu-out). Each step runs even if an earlier one failed; the exit status is the first failure's.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
status=0
step() {  # step NAME COMMAND...: run, keep its log, remember the first failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/steps.txt"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}
step pytest-gpu python3 -m pytest -q -m gpu tests/test_gpu.py
step bench-server python3 -m ktl bench server --device cuda --write docs/benchmarks.md
step bench-generate python3 -m ktl bench generate --device cuda --compile --write docs/benchmarks.md
cp docs/benchmarks.md "$OUT/benchmarks.md"
exit $status
