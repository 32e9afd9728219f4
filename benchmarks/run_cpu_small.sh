#!/usr/bin/env bash
# docs/results.md, "cpu-small": FedKTL and training alone, 3 seeds each, then the table.
# Usage: benchmarks/run_cpu_small.sh [OUT_DIR]   (about 30 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/cpu-small}
ktl=${KTL:-.venv/bin/ktl}
for method in fedktl local; do
  for seed in 0 1 2; do
    "$ktl" simulate --preset cpu-small --method "$method" --seed "$seed" --out "$out/$method-s$seed" --overwrite --no-progress
  done
done
"${PYTHON:-.venv/bin/python}" benchmarks/summarize_runs.py "$out"
