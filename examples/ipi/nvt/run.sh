#!/usr/bin/env bash
# Classical NVT of azobenzene at 300 K with i-PI and one gaq-ipi client, in a fresh folder.
#   bash examples/ipi/nvt/run.sh [OUT]          (OUT default: runs/ipi/nvt_<date>_<time>; must not exist)
# Environment: MODEL (default azobenzene_w4a8.pt), IPI (default i-pi), GAQ_IPI (default gaq-ipi).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../common.sh"
prepare_run "${1:-runs/ipi/nvt_$(date +%Y%m%d_%H%M%S)}" "$here/input.xml"
start_server
start_client gaq-nvt --threads "${THREADS:-1}"
wait_all
