#!/usr/bin/env bash
# Issue 12's QAT ablation: evaluate one finished run of configs/NAME.yaml (runs/NAME/best.pt) as gaq-report's
# ablation table needs it. The model stays in runs/ (its SHA-256 is in the card); cards and the training log go
# to results/qat_ablation/NAME/.        usage: scripts/qat_ablation.sh NAME   (after scripts/train_shipped.sh NAME)
set -euo pipefail
name=${1:?usage: qat_ablation.sh NAME}
cd "$(dirname "$0")/.."
out="results/qat_ablation/${name}"
mkdir -p "$out"
cp "runs/${name}/best.pt" "runs/${name}/model.pt"
# the conservative mode's reference energies, fitted on 300 training frames (as scripts/ship_model.sh does)
.venv/bin/gaq-quantize "runs/${name}/model.pt" --conservative-reference --calib-frames 300 -o "runs/${name}/model.pt"
cp "runs/${name}/log.csv" "runs/${name}/learning_curves.png" "$out/"
.venv/bin/gaq-eval "runs/${name}/model.pt" --data azobenzene --card "$out/card.json"
.venv/bin/gaq-eval "runs/${name}/model.pt" --data azobenzene --mode conservative --lee-frames 0 --card "$out/card_conservative.json"
.venv/bin/gaq-report
