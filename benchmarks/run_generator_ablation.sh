#!/usr/bin/env bash
# docs/results.md, "What makes the transfer pay": FedKTL on cpu-small with the embedded pretrained
# generator, 3 seeds per variant, two runs at a time on one thread each, then the table.
# Usage: benchmarks/run_generator_ablation.sh [OUT_DIR]   (about 45 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/cpu-small}
ktl=${KTL:-.venv/bin/ktl}
declare -A variants=(
  [fedktl-pretrained]=""
  [fedktl-pretrained-ppc5-mem5]="--fedktl.pairs-per-class 5 --client.pairs-memory 5"
  [fedktl-pretrained-ppc5-mem5-mu5]="--fedktl.pairs-per-class 5 --client.pairs-memory 5 --fedktl.mu 5"
)
jobs=()
for name in fedktl-pretrained fedktl-pretrained-ppc5-mem5 fedktl-pretrained-ppc5-mem5-mu5; do
  for seed in 0 1 2; do
    jobs+=("$ktl simulate --preset cpu-small --method fedktl --seed $seed ${variants[$name]} --out $out/$name-s$seed --overwrite --no-progress")
  done
done
printf '%s\n' "${jobs[@]}" | OMP_NUM_THREADS=1 xargs -P 2 -I{} sh -c '{}'
"${PYTHON:-.venv/bin/python}" benchmarks/summarize_runs.py "$out"
