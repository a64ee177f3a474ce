#!/usr/bin/env bash
# Issue 15 timings in one command, for a quiet machine (nothing else on either core):
#     bash benchmarks/issue15.sh    # 1 and 2 threads; rewrites benchmarks/results/{peers,deploy,scaling}.json, then gaq-report
# From a worktree without its own venv: PY=/work/main/.venv/bin/python PYTHONPATH=$PWD bash benchmarks/issue15.sh
# Each benchmark runs its calculators side by side in one process per thread count (ratios, not ms).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "from gaq_calc.kernels.fused import load_extension; load_extension()"  # build once (~1 min), untimed
$PY benchmarks/peers.py --threads 1 2 --json benchmarks/results/peers.json
$PY benchmarks/deploy.py --threads 1 2 --json benchmarks/results/deploy.json
$PY benchmarks/md_step_profile.py --threads 1 --steps 200 --blocks 5
$PY benchmarks/md_step_profile.py --threads 2 --steps 200 --blocks 5
$PY benchmarks/scaling.py --threads 1 --repeats 3 --peer --json benchmarks/results/scaling.json
# the previous kernel (main before issue 15's kernel work) against this one, MD steps alternated
$PY benchmarks/kernel_versions.py --base 08c787f --md --threads 1 --rounds 7
$PY benchmarks/kernel_versions.py --base 08c787f --md --threads 2 --rounds 7
"$(dirname "$PY")/gaq-report"
