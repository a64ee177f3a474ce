#!/usr/bin/env bash
# Ship a trained run as a model: copy the selected (best validation, EMA) weights and the 40-min
# snapshot into models/NAME/, write models/NAME/card.json with gaq-eval on the test split, and
# regenerate README's results table. Quantized models also get their conservative-mode reference
# energies (gaq-quantize --conservative-reference).      usage: scripts/ship_model.sh NAME
set -euo pipefail
name=${1:?usage: ship_model.sh NAME}
cd "$(dirname "$0")/.."
mkdir -p "models/${name}"
cp "runs/${name}/best.pt" "models/${name}/model.pt"
snap=()
if ls runs/${name}/snapshot_*min.pt >/dev/null 2>&1; then
  s=$(ls runs/${name}/snapshot_*min.pt | head -n 1)
  cp "$s" "models/${name}/$(basename "$s")"
  snap=(--snapshot "models/${name}/$(basename "$s")")
fi
cp "runs/${name}/learning_curves.png" "runs/${name}/log.csv" "models/${name}/"
if .venv/bin/python -c "import sys; from gaq_calc.model.serialization import read_model_file as r; sys.exit(0 if r(sys.argv[1]).get('quant_config') else 1)" "models/${name}/model.pt"; then
  # quantized: fit the conservative mode's reference energies on training frames (bias correction)
  .venv/bin/gaq-quantize "models/${name}/model.pt" --conservative-reference --calib-frames 300 -o "models/${name}/model.pt"
fi
.venv/bin/gaq-eval "models/${name}" "${snap[@]}" --write-card
.venv/bin/gaq-report
