#!/usr/bin/env bash
# The hashing trade-off on planted data (experiment=tradeoff), then both figures:
#   scripts/tradeoff_sweep.sh [extra Hydra overrides]        SEEDS="0 1 2" RATIOS="100,1000"
#   ALL_METHODS_SEEDS=0 scripts/tradeoff_sweep.sh    # other seeds: full tables, hash, budget
# Per seed (trainer.seed: data, initial weights and hashes):
#   1. count every training ID (frequencies/tradeoff_seed<S>.pt): the full tables' vocabulary,
#      the frequency method's head and the budget mode's traffic;
#   2. the full tables (hashing=full: every training ID its own row), the reference;
#   3. every method at each compression ratio (rows = ID space / ratio);
#   4. the budget mode at the full tables' bytes / ratio.
# Each sweep writes multirun/tradeoff/seed<S>/<part>/results.csv (train/sweep_results.py);
# scripts/plot_tradeoff.py reads them all: docs/tradeoff.png, docs/tradeoff_curves.png and
# docs/tradeoff.md. STEPS, OUT and DOCS (default docs) may be set for a quick dry run; seeds
# may run side by side (SEEDS=0 ... & SEEDS=1 ... &), each replacing only its own folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
RATIOS=${RATIOS:-100,1000}
# Seeds that run every method; the others run the full tables, hash and the budget only.
ALL_METHODS_SEEDS=${ALL_METHODS_SEEDS:-$SEEDS}
STEPS=${STEPS:-$($PY -c "import yaml; print(yaml.safe_load(open('conf/experiment/tradeoff.yaml'))['trainer']['steps'])")}
OUT=${OUT:-multirun/tradeoff}
DOCS=${DOCS:-docs}
for seed in $SEEDS; do
  rm -rf "$OUT/seed$seed"
  frequencies=frequencies/tradeoff_seed$seed.pt
  common=(experiment=tradeoff trainer.seed=$seed hashing.frequency_file=$frequencies "$@")
  $PY scripts/count_frequencies.py --steps "$STEPS" --top 100000000 --out "$frequencies" \
    "${common[@]}"
  $PY -m train -m "${common[@]}" hashing=full hydra.sweep.dir=$OUT/seed$seed/full
  methods=default
  if [[ " $ALL_METHODS_SEEDS " == *" $seed "* ]]; then
    methods=default,multi_hash,qr,frequency,managed,shared
  fi
  $PY -m train -m "${common[@]}" hashing=$methods \
    hashing.compression_ratio=$RATIOS hydra.sweep.dir=$OUT/seed$seed/methods
  if [[ $methods != default ]]; then
    $PY -m train -m "${common[@]}" hashing=multi_hash hashing.importance_share=0 \
      hashing.compression_ratio=$RATIOS hydra.sweep.dir=$OUT/seed$seed/multi_hash_plain
  fi
  # The budget mode gets the full tables' bytes (as measured in step 2) over each ratio.
  budgets=$($PY - "$OUT/seed$seed/full/results.csv" "$RATIOS" <<'EOF'
import csv, sys
full = float(next(csv.DictReader(open(sys.argv[1])))["embedding_bytes_hashed"])
print(",".join(str(int(full // float(r))) for r in sys.argv[2].split(",")))
EOF
)
  $PY -m train -m "${common[@]}" hashing.budget_bytes=$budgets \
    hydra.sweep.dir=$OUT/seed$seed/budget
done
$PY scripts/plot_tradeoff.py $OUT --png $DOCS/tradeoff.png --curves-png $DOCS/tradeoff_curves.png \
  --markdown $DOCS/tradeoff.md
