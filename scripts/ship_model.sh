#!/usr/bin/env bash
# Ship a trained run as a model: copy the selected (best validation, EMA) weights and the 40-min
# snapshot into models/NAME/, write models/NAME/card.json with gaq-eval on the test split, and
# regenerate README's results table. Quantized models also get the reference energies of both modes
# refitted on training frames (gaq-quantize --references).      usage: scripts/ship_model.sh NAME
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
quantized=$(.venv/bin/python -c "import sys; from gaq_calc.model.serialization import read_model_file as r; print('yes' if r(sys.argv[1]).get('quant_config') else 'no')" "models/${name}/model.pt")
if [ "$quantized" = yes ]; then
  # quantized: refit both modes' reference energies on training frames (bias correction)
  .venv/bin/gaq-quantize "models/${name}/model.pt" --references --calib-frames 300 -o "models/${name}/model.pt"
fi
.venv/bin/gaq-eval "models/${name}" "${snap[@]}" --write-card
# the deployable artifact (models/NAME.pt), and for quantized models its conservative-mode card
.venv/bin/gaq-export "models/${name}" -o "models/${name}.pt"
if [ "$quantized" = yes ]; then
  data=$(.venv/bin/python -c "import sys; from gaq_calc.model.serialization import read_model_file as r; print(r(sys.argv[1])['metadata']['train_data'])" "models/${name}/model.pt")
  .venv/bin/gaq-eval "models/${name}.pt" --data "$data" --mode conservative --card "models/${name}/card_conservative.json"
fi
.venv/bin/gaq-report
