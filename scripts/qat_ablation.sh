#!/usr/bin/env bash
# Issue 12's QAT ablation: evaluate one finished run of configs/NAME.yaml (runs/NAME/best.pt) as gaq-report's
# ablation table needs it. The model stays in runs/ (its SHA-256 is in the card); cards and the training log go
# to results/qat_ablation/NAME/.
#   usage: scripts/qat_ablation.sh NAME [FROM_RUN [REFIT]]   (after scripts/train_shipped.sh NAME)
# FROM_RUN (default NAME): the run whose best.pt is evaluated, under the name NAME;
# REFIT (default --conservative-reference): the gaq-quantize flag that refits reference energies on 300
# training frames: --conservative-reference (conservative mode only) or --references (both modes).
set -euo pipefail
name=${1:?usage: qat_ablation.sh NAME [FROM_RUN [REFIT]]}
from=${2:-$name}
refit=${3:---conservative-reference}
cd "$(dirname "$0")/.."
out="results/qat_ablation/${name}"
mkdir -p "$out" "runs/${name}"
cp "runs/${from}/best.pt" "runs/${name}/model.pt"
.venv/bin/gaq-quantize "runs/${name}/model.pt" "$refit" --calib-frames 300 -o "runs/${name}/model.pt"
cp "runs/${from}/log.csv" "runs/${from}/learning_curves.png" "$out/"
.venv/bin/gaq-eval "runs/${name}/model.pt" --data azobenzene --card "$out/card.json"
.venv/bin/gaq-eval "runs/${name}/model.pt" --data azobenzene --mode conservative --lee-frames 0 --card "$out/card_conservative.json"
.venv/bin/gaq-report
