#!/usr/bin/env bash
# `clusmar simulate` on held-out shapes: the 100K target run and the sweeps behind the README's
# "Choosing k_m and ε". Results: benchmarks/RESULTS.md. Usage: bash benchmarks/bench_simulate.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-benchmarks/work/sim}
mkdir -p "$WORK"
CLUSMAR=${CLUSMAR:-.venv/bin/clusmar}
timed() { local name=$1; shift; /usr/bin/time -f "$name: %e s wall, %M KB peak" "$CLUSMAR" "$@" --overwrite \
          2>&1 | grep -E "saved|wall|runs in|WARNING clusmar" | tee -a "$WORK/summary.txt"; }
: > "$WORK/summary.txt"
for shape in lognormal heavy-tailed; do
  test -d "$WORK/pool-$shape" || "$CLUSMAR" generate-pool --output "$WORK/pool-$shape" --num-examples 100000 \
    --dim 64 --num-classes 10 --seed 7 --region-sizes "$shape"
done
# The issue's target: 100K pool, 6 rounds x 4 strategies x 3 repetitions, an MLP retrained every round whose
# seed model re-embeds the pool for one clustering (as the paper does); then the same with logistic regression.
timed target-mlp simulate --pool "$WORK/pool-lognormal/*.parquet" --output "$WORK/target-mlp" --model mlp \
  --embedding model --rounds 6 --batch-size 5000 --seed-labels 1000 --repetitions 3
timed target-logistic simulate --pool "$WORK/pool-lognormal/*.parquet" --output "$WORK/target-logistic" \
  --rounds 6 --batch-size 5000 --seed-labels 1000 --repetitions 3
# Sweeps: k_m multipliers x clustering, scikit-learn's digits and both generated shapes.
timed digits simulate --digits --output "$WORK/digits" --rounds 6 --batch-size 50 --seed-labels 50 \
  --repetitions 5 --candidate-multipliers 1.25,2,5,10 --target-cluster-sizes 2,5,10,20
for shape in lognormal heavy-tailed; do
  timed "sweep-$shape" simulate --pool "$WORK/pool-$shape/*.parquet" --output "$WORK/sweep-$shape" --model mlp \
    --embedding model --rounds 6 --batch-size 5000 --seed-labels 1000 --repetitions 2 \
    --strategies cluster-margin,margin,random --candidate-multipliers 1.25,2,10 --target-cluster-sizes 10,50
done
