"""Accuracy of each kernel on the shipped artifacts: the fused kernel against the reference path.

    .venv/bin/python benchmarks/kernel_agreement.py --frames 200 --json benchmarks/results/kernel_agreement.json

For every shipped artifact and mode, on the first N rMD17 split-01 test frames: energy and force MAE
against the DFT labels for the reference and the fused kernel, and how far the kernels are apart
(max |dE|, max |dF|, share of frames that agree to 1e-4 eV and 1e-4 eV/Å). Without activation
rounding the kernels compute the same function in a different float order. In quantized mode the
fused kernel accumulates integer codes exactly where the reference path adds float products, and a
last-bit difference can flip a rounding decision downstream: that is what the agreement columns
measure. Prints a markdown table; not a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import numpy as np
import torch
from ase import Atoms

from gaq_calc import GAQCalculator
from gaq_calc.data import read_frames
from gaq_calc.io import write_text_atomic

VARIANTS = [
    ("azobenzene_fp32.pt", None),
    ("azobenzene_w8a8.pt", "quantized"),
    ("azobenzene_w8a8.pt", "conservative"),
    ("azobenzene_w4a8.pt", "quantized"),
    ("azobenzene_w4a8.pt", "conservative"),
]


def evaluate(calc: GAQCalculator, frames, n: int):
    energies, forces = [], []
    for k in range(n):
        atoms = Atoms(numbers=frames.numbers[k], positions=frames.positions[k])
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    return np.array(energies), np.array(forces)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a benchmark process, not library code
    frames = read_frames("azobenzene", "test")
    n = min(args.frames, len(frames.energies))
    e_dft, f_dft = np.asarray(frames.energies[:n]), np.asarray(frames.forces[:n])
    rows = []
    for model, mode in VARIANTS:
        kwargs = {"mode": mode} if mode else {}
        out = {}
        for kernel in ("reference", "fused"):
            calc = GAQCalculator(model, kernel=kernel, **kwargs)
            out[kernel] = evaluate(calc, frames, n)
        (e_r, f_r), (e_f, f_f) = out["reference"], out["fused"]
        de, df = np.abs(e_f - e_r), np.abs(f_f - f_r).reshape(n, -1).max(1)
        rows.append(
            {
                "model": model,
                "mode": mode or "fp32",
                "frames": n,
                "reference_E_MAE_meV": 1e3 * float(np.abs(e_r - e_dft).mean()),
                "fused_E_MAE_meV": 1e3 * float(np.abs(e_f - e_dft).mean()),
                "reference_F_MAE_meV_per_A": 1e3 * float(np.abs(f_r - f_dft).mean()),
                "fused_F_MAE_meV_per_A": 1e3 * float(np.abs(f_f - f_dft).mean()),
                "max_dE_meV": 1e3 * float(de.max()),
                "max_dF_meV_per_A": 1e3 * float(df.max()),
                "agree_share": float(((de < 1e-4) & (df < 1e-4)).mean()),
            }
        )
        print(f"  {model} {rows[-1]['mode']}: max |dE| {rows[-1]['max_dE_meV']:.3g} meV", file=sys.stderr)
    command = shlex.join(["python", "benchmarks/kernel_agreement.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"`{command}`, first {n} test frames:",
        "",
        "| artifact | mode | E MAE ref / fused (meV) | F MAE ref / fused (meV/Å) | max abs dE (meV) | "
        "max abs dF (meV/Å) | frames agreeing to 1e-4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['reference_E_MAE_meV']:.2f} / {r['fused_E_MAE_meV']:.2f} | "
            f"{r['reference_F_MAE_meV_per_A']:.2f} / {r['fused_F_MAE_meV_per_A']:.2f} | "
            f"{r['max_dE_meV']:.3g} | {r['max_dF_meV_per_A']:.3g} | {100 * r['agree_share']:.0f}% |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        write_text_atomic(args.json, json.dumps({"rows": rows, "markdown": markdown}, indent=1) + "\n")


if __name__ == "__main__":
    main()
