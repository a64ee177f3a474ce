"""Where the float32 LEE of quantized mode comes from: rounding decisions that flip under a rotation.

Rounded activations are exactly equivariant in exact arithmetic (LEE in float64 is ~1e-11 meV/Å on every
card), but in float32 a rotated molecule's invariants differ from the original's by ~1e-7, and an
activation that lies within that distance of a rounding boundary rounds the other way. A flip moves that
activation by a whole step, so the forces of that (frame, rotation) pair change by far more than float noise,
while most pairs see no flip at all. This script measures that picture on test frames, with the card's LEE
definition (per pair: mean over atoms of |F(Rx) - R F(x)|, eager network, float32):

  - the distribution over (frame, rotation) pairs: mean (the card's LEE), median, 90th percentile, max,
    and the share of pairs with no flip (error below 0.02 meV/Å, FP32's noise is ~0.008);
  - which quantizers flip: all rounded, only the scalar-branch (per-tensor) ones, only the l=1 frame ones;
  - rotating the positions in float64 before the network's float32 cast, instead of in float32;
  - finer steps over the same clipping range (A10, A12): more boundaries, smaller jumps;
  - the same model in float64 (rounding boundaries are not reached by ~1e-16 noise).

    python scripts/lee_flips.py --model models/azobenzene_w4a8_mp/model.pt --frames 50 \
        --out results/lee_flips/azobenzene_w4a8_mp

writes OUT.json and OUT.md. gaq-report puts the table in README.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gaq_calc.cli.report import lee_flips_markdown
from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.data.graphs import centred
from gaq_calc.io import write_text_atomic
from gaq_calc.loading import load_model
from gaq_calc.metrics import random_rotations
from gaq_calc.model.network import energy_and_forces
from gaq_calc.quant.api import round_at_bits
from gaq_calc.quant.modules import ActQuantizer, FrameQuantizer, IdentityQuantizer
from gaq_calc.units import MEV_PER_EV

NO_FLIP_MEV_PER_A = 0.02  # a pair below this saw float noise only (FP32 models: ~0.008 meV/Å)


def pair_errors(model, dataset, rotations, dtype, rotate_in_float64: bool) -> np.ndarray:
    """[frames * rotations] mean over atoms of |F(Rx) - R F(x)| in meV/Å, one molecule per call."""
    errors = []
    for i in range(len(dataset)):
        batch = dataset.collate([i]).to("cpu", dtype)
        _, forces = energy_and_forces(model, batch)
        exact = torch.as_tensor(centred(dataset.frames.positions[i]), dtype=torch.float64)  # as collate centres
        for rot in rotations:
            positions = (exact @ rot.T).to(dtype) if rotate_in_float64 else batch.positions @ rot.to(dtype).T
            _, forces_rot = energy_and_forces(model, replace(batch, positions=positions))
            diff = forces_rot.detach().double() - forces.detach().double() @ rot.T  # [n_atoms, 3]
            errors.append(float(diff.norm(dim=-1).mean()) * MEV_PER_EV)
    return np.asarray(errors)


def summary(label: str, errors: np.ndarray, rounded: str, **extra) -> dict:
    return {
        "label": label,
        "rounded": rounded,
        "lee_mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "p90": float(np.percentile(errors, 90)),
        "max": float(errors.max()),
        "no_flip_share": float((errors < NO_FLIP_MEV_PER_A).mean()),
        **extra,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a quantized model file (QAT checkpoint)")
    parser.add_argument("--data", default="azobenzene")
    parser.add_argument("--frames", type=int, default=50, help="first N test frames")
    parser.add_argument("--rotations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a script, not library code: one core, as the card's evaluation
    t0 = time.time()
    model, _ = load_model(args.model)
    frames = read_frames(args.data, "test").subset(np.arange(args.frames))
    dataset = GraphDataset(frames, [int(z) for z in model.atomic_numbers.tolist()], float(model.cutoff))
    rotations = random_rotations(args.rotations, args.seed)
    named = [
        (n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer) and not isinstance(m, IdentityQuantizer)
    ]
    if not named:
        raise SystemExit(f"{args.model}: no activation quantizers (not a quantized model)")
    if any(".vector_mix." in n and not isinstance(m, FrameQuantizer) for n, m in named):
        raise SystemExit(
            f"{args.model}: l=1 activations not rounded in the local frame (this script splits frame models)"
        )
    quantizers = [m for _, m in named]

    def only(predicate) -> str:
        for q in quantizers:
            q.enabled = predicate(q)
        return f"{sum(q.enabled for q in quantizers)} of {len(quantizers)}"

    rows = []
    for label, predicate in (
        ("all rounded (the card's LEE)", lambda q: True),
        ("only scalar-branch rounding", lambda q: not isinstance(q, FrameQuantizer)),
        ("only l=1 frame rounding", lambda q: isinstance(q, FrameQuantizer)),  # (the vector mix; checked above)
        ("none rounded (conservative)", lambda q: False),
    ):
        rounded = only(predicate)
        rows.append(summary(label, pair_errors(model, dataset, rotations, torch.float32, False), rounded))
    rounded = only(lambda q: True)
    rows.append(
        summary(
            "all rounded, positions rotated in float64",
            pair_errors(model, dataset, rotations, torch.float32, True),
            rounded,
        )
    )
    for bits in (10, 12):  # finer steps over the same clipping range, as scripts/quant_sensitivity.py
        for q in quantizers:
            round_at_bits(q, bits)
        rows.append(
            summary(
                f"all rounded at A{bits} (same range)",
                pair_errors(model, dataset, rotations, torch.float32, False),
                rounded,
            )
        )
    for q in quantizers:
        round_at_bits(q, None)
    rows.append(
        summary(
            "all rounded, network in float64",
            pair_errors(model.double(), dataset, rotations, torch.float64, False),
            rounded,
        )
    )
    result = {
        "command": shlex.join(["python", "scripts/lee_flips.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model,
        "frames": args.frames,
        "rotations": args.rotations,
        "no_flip_below_meV_per_A": NO_FLIP_MEV_PER_A,
        "seconds": time.time() - t0,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), lee_flips_markdown(result) + "\n")
    print(lee_flips_markdown(result))


if __name__ == "__main__":
    main()
