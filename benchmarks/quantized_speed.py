"""Issue 12 item 5: is the real W4A8 (quantized mode, rounded 8-bit activations) slower than FP32 per call?

    .venv/bin/python benchmarks/quantized_speed.py --threads 1 --blocks 7 --calls 300 \
        --json benchmarks/results/quantized_speed.json

One process, every variant built once, then timed in interleaved blocks (variant order rotates each block), so
that the machine's drift hits every variant alike: FP32 (fused kernel), the W4A8 and W8A8 artifacts in quantized
mode with each integer engine of the fused kernel ("float": integer-valued codes through MKL's sgemm; "int32":
int8 codes with int32 sums, AVX512-VNNI where the CPU has it; both give the same bits) and in conservative mode.
A call is GAQCalculator.calculate (energy and forces) of one azobenzene (24 atoms) whose positions move every call.
The table gives the median over blocks of each block's mean and the ratio FP32 / this (above 1: faster than
FP32). Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# (label, artifact, mode, int_gemm)
VARIANTS = [
    ("FP32", "azobenzene_fp32.pt", None, "auto"),
    ("W4A8 quantized, sgemm engine", "azobenzene_w4a8.pt", "quantized", "float"),
    ("W4A8 quantized, int8 engine", "azobenzene_w4a8.pt", "quantized", "int32"),
    ("W4A8-mp quantized, int8 engine", "azobenzene_w4a8_mp.pt", "quantized", "int32"),
    ("W8A8 quantized, sgemm engine", "azobenzene_w8a8.pt", "quantized", "float"),
    ("W8A8 quantized, int8 engine", "azobenzene_w8a8.pt", "quantized", "int32"),
    ("W4A8 conservative", "azobenzene_w4a8.pt", "conservative", "auto"),
]


def block_mean(calc, atoms, calls: int, rng) -> float:
    base = atoms.positions.copy()
    t0 = time.perf_counter()
    for _ in range(calls):
        atoms.positions = base + rng.normal(scale=1e-3, size=base.shape)
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
    atoms.positions = base
    return (time.perf_counter() - t0) / calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300, help="calls per variant per block")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import torch
    from ase import Atoms
    from md_step import engine_calculator  # (benchmarks/, the script's folder)

    from gaq_calc.data import read_frames
    from gaq_calc.kernels.fused import int8_simd

    torch.set_num_threads(args.threads)  # a benchmark process, not library code
    frames = read_frames("azobenzene", "test")
    atoms = Atoms(numbers=frames.numbers[0], positions=frames.positions[0])
    calcs = [engine_calculator(REPO / "models" / a, m, e) for _, a, m, e in VARIANTS]
    rng = np.random.default_rng(0)
    for calc in calcs:  # warm-up: workspaces, caches
        block_mean(calc, atoms, 20, rng)
    times = [[] for _ in VARIANTS]
    for b in range(args.blocks):
        order = np.roll(np.arange(len(VARIANTS)), b)
        for k in order:
            times[k].append(block_mean(calcs[k], atoms, args.calls, rng))
        print(
            f"block {b + 1}/{args.blocks}: " + ", ".join(f"{1e3 * t[-1]:.2f}" for t in times) + " ms", file=sys.stderr
        )
    fp32 = float(np.median(times[0]))
    rows = []
    for (label, artifact, mode, _), calc, t in zip(VARIANTS, calcs, times):
        ef = calc.energy_forces
        rows.append(
            {
                "variant": label,
                "artifact": artifact,
                "mode": mode or "fp32",
                "int_gemm": getattr(ef, "int_gemm", None) if mode == "quantized" else None,
                "int8_simd": bool(getattr(ef, "int8_simd", False)) if mode == "quantized" else None,
                "ms_per_call": 1e3 * float(np.median(t)),
                "ms_min": 1e3 * float(np.min(t)),
                "ms_max": 1e3 * float(np.max(t)),
                "fp32_over_this": fp32 / float(np.median(t)),
            }
        )
    result = {
        "command": shlex.join(["python", "benchmarks/quantized_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "threads": args.threads,
        "int8_simd_built": int8_simd(),
        "rows": rows,
    }
    result["markdown"] = markdown(result)
    print(result["markdown"])
    if args.json:
        from gaq_calc.io import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` on {result['machine']}, torch {result['torch']}, {result['threads']} thread(s); "
        f"kernel built with the AVX512-VNNI int8 loop: {'yes' if result['int8_simd_built'] else 'no'}. Median over "
        "interleaved blocks of the mean GAQCalculator call (energy + forces, 24 atoms):",
        "",
        "| variant | int8 engine | ms / call | range over blocks | FP32 / this |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        engine = {None: "–", "float": "sgemm (integer-valued floats)", "int32": "int8 x int8 -> int32"}[r["int_gemm"]]
        if r["int_gemm"] == "int32":
            engine += ", VNNI" if r["int8_simd"] else ", portable loop"
        lines.append(
            f"| {r['variant']} | {engine} | {r['ms_per_call']:.3f} | {r['ms_min']:.3f}–{r['ms_max']:.3f} | "
            f"{r['fp32_over_this']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
