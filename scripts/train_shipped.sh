#!/usr/bin/env bash
# Train (or resume) one shipped model: scripts/train_shipped.sh azobenzene_fp32
# Rerunning the same command resumes from runs/NAME/checkpoint.pt.
set -euo pipefail
name=${1:?usage: train_shipped.sh NAME [extra gaq-train flags]}
shift
cd "$(dirname "$0")/.."
# glibc returns big freed blocks to the OS by default; keeping them makes training ~20% faster here
# Run nothing else CPU-heavy beside it: OpenMP spin-waits collapse throughput when cores are shared
# (and OMP_WAIT_POLICY=PASSIVE halves it on 2 cores; measured).
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967295 MALLOC_TOP_PAD_=268435456
exec .venv/bin/gaq-train --config "configs/${name}.yaml" --no-progress "$@"
