#!/usr/bin/env bash
# The TerraMind method end to end on a laptop CPU, at smoke size, on the synthetic world.
# Everything goes under one folder: OUT=runs/cpu by default. Later stages are appended as they land.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/cpu}
mkdir -p "$OUT"
SECONDS=0

echo "== 1/1 data: the synthetic TerraMesh world"
python terramesh.py synth --out "$OUT/data" --n 2000 --size 64
python terramesh.py show --root "$OUT/data" --id 00005 --out "$OUT/sample.png"
python terramesh.py stats --root "$OUT/data" --limit 500

echo "done in ${SECONDS} s; outputs in $OUT"
