#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch 2.13.0 first (on this kind of machine pip finds its wheel
# on disk; an unpinned torch would pull a multi-GB CUDA build), then gaq_calc and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, e3nn, ase, matscipy, h5py, gaq_calc; print('gaq_calc ready: torch', torch.__version__)"
