#!/usr/bin/env bash
# Baselines of the quantization table (README), all on the shipped azobenzene_fp32 model:
#   scripts/baseline.sh train NAME [gaq-train flags]   QAT from configs/baselines/NAME.yaml (rerun to resume),
#                                                      then its card
#   scripts/baseline.sh ptq PRESET [gaq-eval flags]    post-training quantization under PRESET, then its card
# Cards and training logs go to results/quant_baselines/NAME/; the models stay in runs/baselines/
# (their SHA-256 is in the card). Then `gaq-report` regenerates results/quant_table.{md,json} and README.
set -euo pipefail
mode=${1:?usage: baseline.sh train|ptq NAME [flags]}
name=${2:?usage: baseline.sh train|ptq NAME [flags]}
shift 2
cd "$(dirname "$0")/.."
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967295 MALLOC_TOP_PAD_=268435456
out="results/quant_baselines/${name}"
mkdir -p "$out"
case "$mode" in
  train)
    .venv/bin/gaq-train --config "configs/baselines/${name}.yaml" --no-progress "$@"
    cp "runs/baselines/${name}/log.csv" "runs/baselines/${name}/learning_curves.png" "$out/"
    .venv/bin/gaq-eval "runs/baselines/${name}/best.pt" --data azobenzene --card "$out/card.json" ;;
  ptq)
    mkdir -p "runs/baselines/${name}"
    .venv/bin/gaq-quantize azobenzene_fp32 --preset "$name" -o "runs/baselines/${name}/model.pt"
    .venv/bin/gaq-eval "runs/baselines/${name}/model.pt" --data azobenzene --card "$out/card.json" "$@" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
