#!/usr/bin/env bash
# The GPU figures and checks as one prepared run on the device machine (its image: Python 3.12, torch +
# CUDA, no diffusers/fastapi/uvicorn/pydantic; pytest and pytest-timeout are there).
#
# Prepare here, once:   ../shared/tools/gpu-wheels.sh           # the missing wheels into .whl/ (git-ignored)
# Run there:            bash benchmarks/run_gpu.sh                 # device tool: carry [".whl"], timeout_s 590
# Rehearse on the CPU:  bash benchmarks/run_gpu.sh --device cpu    # same steps, same files (benchmarks/README.md)
#
# Steps, in this order, each under `timeout` (estimate on one H200 ; its limit):
#   1 setup           the wheels offline into $SITE, ktl editable (pip; a source tree of links if that
#                     fails), every command logged to setup.log; fails loudly      ~0.5 min ; 60 s
#   2 imports         ktl.cli, ktl.api, ktl.generate, the bench modules, diffusers,
#                     fastapi, torch's device: the run stops here with the error    ~0.3 min ; 45 s
#   3 bench-server    C = 10 and C = 100 (20 clients) against the warmed-up
#                     reference round (2 × 2 000 reference steps dominate), then
#                     job vs bare throughput at 3 batch sizes                        ~1.5 min ; 170 s
#   4 pytest-gpu      the 7 tests of tests/test_gpu.py, each with a deadline of
#                     $KTL_GPU_TEST_TIMEOUT s (60; a SIGALRM timer in the test
#                     module, no plugin needed)                                       ~1.2 min ; 150 s
#   5 bench-generate  the embedded generator only: fp32/bf16 × batch 256/1024/4096
#                     (8 192 images a cell, best of 2) and ONE compiled cell
#                     (bf16 × 1024; its cold compile ~1 min)                         ~1.5 min ; 150 s
#   Total ≈ 5 min by estimate, well under 7 (a rerun fits while the machine is warm); the limits add up
#   to 575 s, under the device tool's 10 minutes a command. Measured on one H200 (2026-12-04): 181 s
#   (setup 11, imports 22, bench-server 65, pytest-gpu 33, bench-generate 50).
# Optional, by --steps (comma-separated, default bench-server,pytest-gpu,bench-generate) and --unet:
#   --unet            bench-generate also times the diffusers UNet (64×64, DDIM 5 steps); limit 240 s
#                     (195 s on the H200)
#   6 gpu-round       `ktl simulate --preset gpu --method fedktl --rounds $KTL_GPU_ROUNDS` (3) on all of
#                     Fashion-MNIST, each round's phases printed by benchmarks/round_times.py; needs the
#                     data there: here `mkdir -p .data && cp /usr/share/datasets/fashion-mnist/* .data/ &&
#                     echo /.data/ >> .git/info/exclude`, carry [".whl", ".data"], run with
#                     KTL_DATA_DIR=$PWD/.data                                          ~3 min ; 230 s
# Steps 3-5 run even if an earlier one failed (the exit status is the first failure's); steps 1-2 stop
# the run. After EVERY step the bench JSON and $OUT/benchmarks.md (docs/benchmarks.md with the sections
# the benchmarks wrote: server-cuda, generate-cuda) are already in $OUT, so a run killed at its limit
# still brings back what finished. docs/benchmarks.md itself is never written: merge by hand,
#   cp <files_at>/benchmarks.md docs/benchmarks.md && git diff docs/benchmarks.md
# $OUT holds at most these 8 files: steps.txt (each step's command, rc, seconds, files), setup.log,
# bench-server.{json,log}, pytest-gpu.log, bench-generate.{json,log}, benchmarks.md.
#
# Options (the CPU rehearsal sets them): --device cpu|cuda (default cuda); environment: OUT (default
# ./gpu-out), WHEELS (default .whl), SITE (default /tmp/site), PYTHON (default python3), KTL_TIME_SCALE
# (every limit × this; default 1 on cuda, 6 on cpu, where a 2-core box is far slower than the H200).
set -uo pipefail

DEVICE=cuda
STEPS_WANTED=bench-server,pytest-gpu,bench-generate
UNET=0
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=${2:?--device needs cpu or cuda}; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --steps) STEPS_WANTED=${2:?--steps needs a comma-separated list}; shift 2 ;;
    --steps=*) STEPS_WANTED=${1#--steps=}; shift ;;
    --unet) UNET=1; shift ;;
    *) echo "run_gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case $DEVICE in cpu | cuda) ;; *) echo "run_gpu.sh: --device must be cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac
for name in ${STEPS_WANTED//,/ }; do
  case $name in bench-server | pytest-gpu | bench-generate | gpu-round) ;;
    *) echo "run_gpu.sh: --steps: unknown step $name (bench-server, pytest-gpu, bench-generate, gpu-round)" >&2; exit 2 ;;
  esac
done
wanted() { [[ ",$STEPS_WANTED," == *",$1,"* ]]; }

OUT=${OUT:-gpu-out}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
if [ "$DEVICE" = cpu ]; then SCALE=${KTL_TIME_SCALE:-6}; else SCALE=${KTL_TIME_SCALE:-1}; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=$OUT/steps.txt
DOCS=$OUT/benchmarks.md
: >"$STEPS"
cp docs/benchmarks.md "$DOCS"
export PYTHONUNBUFFERED=1 KTL_GPU_TEST_DEVICE=$DEVICE KTL_GPU_TEST_TIMEOUT=$((60 * SCALE))

note() { echo "$*" | tee -a "$STEPS"; }
note "run_gpu.sh --device $DEVICE: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), limits × $SCALE"
if [ "$DEVICE" = cuda ]; then
  note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
fi

status=0
# step NAME LIMIT_S STDOUT_FILE COMMAND...: run under timeout (limit × SCALE), stdout to STDOUT_FILE (a
# JSON for the benchmarks) or the log, stderr to $OUT/NAME.log; note rc, seconds and the files in $OUT.
step() {
  local name=$1 limit=$(($2 * SCALE)) stdout=$3
  shift 3
  note "== $name (limit ${limit} s): $(echo "$*" | tr -s ' \n' ' ' | cut -c1-300)"
  local t0=$SECONDS rc
  if [ "$stdout" = - ]; then
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$stdout" 2>"$OUT/$name.log"
  fi
  rc=$?
  [ $rc -eq 124 ] && note "   TIMED OUT after ${limit} s"
  note "   rc=$rc in $((SECONDS - t0)) s; \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return $rc
}

# -- 1 setup: fails loudly ----------------------------------------------------------------------------------
t0=$SECONDS
note "== setup: $WHEELS/*.whl into $SITE; ktl editable"
{
  echo "+ $PY: $(command -v "$PY")"
  "$PY" --version
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$OUT/setup.log" 2>&1
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  note "   SETUP FAILED: no wheels in $WHEELS (run ../shared/tools/gpu-wheels.sh here and carry .whl)"
  exit 3
fi
if ! timeout -k 5 $((40 * SCALE)) "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$OUT/setup.log" 2>&1; then
  note "   SETUP FAILED: pip could not install $WHEELS/*.whl (setup.log):"
  tail -5 "$OUT/setup.log" | tee -a "$STEPS"
  exit 3
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if ! timeout -k 5 $((20 * SCALE)) "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
  >>"$OUT/setup.log" 2>&1; then
  # No setuptools >= 77 there, say: ktl's package layout (pyproject's package-dir) as a tree of links.
  note "   pip install -e . FAILED (setup.log); ktl imported from a tree of links instead"
  tail -3 "$OUT/setup.log" | tee -a "$STEPS"
  src=$SITE/ktl-src/ktl
  rm -rf "$SITE/ktl-src" && mkdir -p "$src"
  for f in "$PWD"/ktl/*; do ln -s "$f" "$src/"; done
  for pair in benchmarks:benchmarks generator:generator aligner:aligner api:api clients:clients; do
    ln -sfn "$PWD/${pair%%:*}" "$src/${pair##*:}"
  done
  export PYTHONPATH=$SITE/ktl-src:$PYTHONPATH
fi
note "   rc=0 in $((SECONDS - t0)) s"

# -- 2 imports: every module the steps below need; stops the run with its error ----------------------------
IMPORTS='
import importlib, torch
for name in ("ktl.cli", "ktl.api", "ktl.generate", "ktl.benchmarks.server", "ktl.benchmarks.generate",
             "ktl.benchmarks.reference_round", "diffusers", "fastapi", "fastapi.testclient", "uvicorn",
             "pydantic_settings", "tests.test_gpu", "tests.api.conftest", "tests.test_generator_adapters"):
    importlib.import_module(name)
    print("ok", name)
device = torch.device(__import__("sys").argv[1])
torch.ones(2, device=device).sum().item()
print("ok device", device, torch.cuda.get_device_name(0) if device.type == "cuda" else "")
'
step imports 45 - "$PY" -c "$IMPORTS" "$DEVICE" || {
  note "   STOPPED: an import failed (imports.log below)"
  tail -15 "$OUT/imports.log" | tee -a "$STEPS"
  exit 4
}
# keep $OUT to 8 files: the import log joins setup.log
cat "$OUT/imports.log" >>"$OUT/setup.log" && rm -f "$OUT/imports.log"

# -- 3 the server round against the reference, C = 10 and C = 100 --------------------------------------------
if [ "$DEVICE" = cuda ]; then
  THROUGHPUT=(--jobs 1024 --repeats 3)
else  # a loaded 2-core CPU makes ~50 images/s: fewer images per throughput measurement
  THROUGHPUT=(--jobs 128 --repeats 2)
fi
wanted bench-server && step bench-server 170 "$OUT/bench-server.json" "$PY" -m ktl bench server --device "$DEVICE" \
  --cases 10x20,100x20 "${THROUGHPUT[@]}" --json --write "$DOCS"

# -- 4 the GPU tests (per-test deadline: KTL_GPU_TEST_TIMEOUT) -----------------------------------------------
wanted pytest-gpu && step pytest-gpu 150 - "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=0 tests/test_gpu.py

# -- 5 a trimmed generation benchmark: embedded generator, fp32/bf16, one compiled cell ----------------------
if [ "$DEVICE" = cuda ]; then
  GRID=(--batch-sizes 256,1024,4096 --images 8192 --compile-cells bf16x1024)
else  # the same grid shape at a CPU's pace (~700 images/s on 2 cores)
  GRID=(--batch-sizes 16,64,256 --images 256 --compile-cells bf16x64)
fi
NO_UNET=(--no-unet) GEN_LIMIT=150
[ "$UNET" = 1 ] && NO_UNET=() GEN_LIMIT=240  # the diffusers UNet's cells too (~1-2 min more on an H200)
wanted bench-generate && step bench-generate $GEN_LIMIT "$OUT/bench-generate.json" "$PY" -m ktl bench generate \
  --device "$DEVICE" --processes 0 "${NO_UNET[@]}" --precisions fp32,bf16 --repeats 2 --compile "${GRID[@]}" --json --write "$DOCS"

# -- 6 (only with --steps ...,gpu-round) the gpu profile's first rounds, timed --------------------------------
# `ktl bench accuracy --profile gpu` has never run whole (100 rounds); this times its first rounds of FedKTL
# on all of Fashion-MNIST (KTL_DATA_DIR, carried) and prints each round's phases (benchmarks/round_times.py).
if wanted gpu-round; then
  ROUNDS=${KTL_GPU_ROUNDS:-3}
  RUN_DIR=$(mktemp -d)/gpu-round
  GPU_ROUND="timeout -k 5 $((200 * SCALE)) $PY -m ktl simulate --preset gpu --method fedktl --rounds $ROUNDS \
    --device $DEVICE --data.global-test-size 10000 --no-progress --out $RUN_DIR; rc=\$?;
    $PY benchmarks/round_times.py $RUN_DIR; exit \$rc"
  step gpu-round 230 - bash -c "$GPU_ROUND"
fi

note "done: rc=$status in $SECONDS s; \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
