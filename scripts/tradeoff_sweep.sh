#!/usr/bin/env bash
# The hashing trade-off: methods x compression ratios on planted data, then the plot.
#   scripts/tradeoff_sweep.sh [extra Hydra overrides]
# Writes multirun/tradeoff/<n>/summary.json and, when the sweep ends, multirun/tradeoff/results.csv
# (one row per point, train/sweep_results.py), which the plot reads: docs/tradeoff.png and
# docs/tradeoff.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# frequency needs the most frequent IDs of the training stream first.
$PY scripts/count_frequencies.py --steps 200 --top 200000 experiment=tradeoff "$@"
rm -rf multirun/tradeoff
$PY -m train -m experiment=tradeoff \
  hashing=modulo,default,multi_hash,qr,frequency,managed \
  hashing.compression_ratio=4,16,64,256 \
  hydra.sweep.dir=multirun/tradeoff "$@"
$PY scripts/plot_tradeoff.py multirun/tradeoff --png docs/tradeoff.png --markdown docs/tradeoff.md
