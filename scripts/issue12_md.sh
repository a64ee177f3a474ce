#!/usr/bin/env bash
# Issue 12's MD measurements with rounded activations, one run after another on one core; every run is
# resumable, so rerunning this script continues where a stop left it (finished runs return at once).
#   CORE=1 scripts/issue12_md.sh            (several core-hours; pin it to a free core)
# OUT_ROOT (default results/md) is where the NVE run goes and NVT_ROOT (default results/md_nvt) the NVT runs; a
# session that may stop them midway can use runs/md for both (ignored by git) and copy the finished runs'
# summary.json and energies.png to results/md/ and results/md_nvt/.
# 1. NVT sampling fidelity: Langevin at 300 K, 200 ps each, for FP32 (two seeds: the noise floor) and the shipped
#    mixed-precision W4A8 in quantized and conservative mode (same weights); md_protocols/sampling.py draws the
#    distributions and writes the Wasserstein-1 table. The quantized runs use seed 0, so the reference is FP32
#    seed 1: a run with the reference's seed shares its thermostat noise.
# 2. NVE, 1 ns, mixed-precision W4A8 in quantized mode, the protocol of results/md/nve_azobenzene_fp32.
# 3. NVT of the shipped W4A8 in quantized mode, and the table again with it. (Most informative runs first, so a
#    stop midway leaves usable results.)
set -euo pipefail
cd "$(dirname "$0")/.."
core=${CORE:-0}
root=${OUT_ROOT:-results/md}
nvt_root=${NVT_ROOT:-results/md_nvt}
# the committed table (results/md/sampling) is drawn from committed runs only; runs elsewhere get their own
if [ "$nvt_root" = results/md_nvt ]; then sampling_out=results/md/sampling; else sampling_out=$nvt_root/sampling; fi
run() { taskset -c "$core" env OMP_NUM_THREADS=1 .venv/bin/python "$@" --threads 1 --no-progress --restart; }
nvt() {  # OUT MODEL SEED [--mode M]
  local out=$1 model=$2 seed=$3
  shift 3
  run md_protocols/nvt.py --model "$model" --thermostat langevin --temperature 300 --time-ps 200 --seed "$seed" \
    --out "$nvt_root/$out" "$@"
}
sampling() {  # RUN... : the table and figure of these runs against FP32 seed 1 (seed 0 is the noise floor)
  .venv/bin/python md_protocols/sampling.py "$@" --reference "$nvt_root/nvt_azobenzene_fp32_seed1" \
    --noise-floor "$nvt_root/nvt_azobenzene_fp32_seed0" --skip-ps 10 --out "$sampling_out"
}
nvt nvt_azobenzene_fp32_seed0 azobenzene_fp32.pt 0
nvt nvt_azobenzene_w4a8_mp_quantized azobenzene_w4a8_mp.pt 0 --mode quantized
nvt nvt_azobenzene_fp32_seed1 azobenzene_fp32.pt 1
nvt nvt_azobenzene_w4a8_mp_conservative azobenzene_w4a8_mp.pt 0 --mode conservative
sampling "$nvt_root/nvt_azobenzene_w4a8_mp_quantized" "$nvt_root/nvt_azobenzene_w4a8_mp_conservative"
run md_protocols/nve.py --model azobenzene_w4a8_mp.pt --mode quantized --time-ps 1000 --equilibrate-ps 2 \
  --out "$root/nve_azobenzene_w4a8_mp_quantized"
nvt nvt_azobenzene_w4a8_quantized azobenzene_w4a8.pt 0 --mode quantized
sampling "$nvt_root/nvt_azobenzene_w4a8_mp_quantized" "$nvt_root/nvt_azobenzene_w4a8_mp_conservative" \
  "$nvt_root/nvt_azobenzene_w4a8_quantized"
