#!/usr/bin/env bash
# Path-integral MD of azobenzene at 300 K (8 beads, PILE-L) with i-PI and two gaq-ipi clients, in a
# fresh folder.
#   bash examples/ipi/pimd/run.sh [OUT]         (OUT default: runs/ipi/pimd_<date>_<time>; must not exist)
# Environment: MODEL (default azobenzene_w4a8.pt), CLIENTS (default 2), IPI, GAQ_IPI as in nvt/run.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../common.sh"
prepare_run "${1:-runs/ipi/pimd_$(date +%Y%m%d_%H%M%S)}" "$here/input.xml"
start_server
for _ in $(seq "${CLIENTS:-2}"); do
    start_client gaq-pimd --threads 1
done
wait_all
