#!/usr/bin/env bash
# 1M-example pool (64-d, 100 classes): generate, cluster, select k_t = 100K on DirectRunner.
# Each stage runs under /usr/bin/time -v; wall time and peak RSS go to benchmarks/work/1m/*.time.
# Usage: bash benchmarks/run_1m.sh [EXTRA BEAM FLAGS...]   (e.g. --direct_num_workers=2 --direct_running_mode=multi_processing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-benchmarks/work/1m}
N=${N:-1000000}
EPS=${EPS:-0.15}
mkdir -p "$WORK"
run() {
  local name=$1; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$PY" -m clusmar_beam.app.cli "$@"
  echo "$name: wall $(grep 'Elapsed (wall' "$WORK/$name.time" | awk '{print $NF}'), peak RSS $(grep 'Maximum resident' "$WORK/$name.time" | awk '{printf "%.2f GB", $NF/1048576}')"
}
run generate generate-pool --output "$WORK/pool" --num-examples "$N" --dim 64 --num-classes 100 --seed 0 --overwrite "$@"
run cluster cluster --pool "$WORK/pool/pool-*.parquet" --output "$WORK/clusters" --distance-threshold "$EPS" --overwrite "$@"
run select select --pool "$WORK/pool/pool-*.parquet" --clusters "$WORK/clusters" --batch-size $((N / 10)) \
  --output "$WORK/manifest" --overwrite "$@"
"$PY" -c "import json,sys; c=json.load(open('$WORK/clusters/clustering.json')); m=json.load(open('$WORK/manifest/manifest.json')); print('clusters', c['num_clusters'], 'mean size', round(c['mean_cluster_size'],2), 'largest', c['largest_cluster']); print('selected', m['selected'], 'of', m['unlabeled_count'], 'k_m', m['k_m'], 'clusters selected', m['clusters_selected'])"
