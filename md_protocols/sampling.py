#!/usr/bin/env python
"""NVT sampling fidelity: distributions of bond lengths, bond angles, the C-N=N-C dihedral and the kinetic
temperature of several runs against a reference run, as Wasserstein-1 distances, next to the distance
between two reference runs that differ only in their seed (the noise floor). Example:
    python md_protocols/sampling.py results/md_nvt/nvt_azobenzene_w4a8_mp_quantized \\
        results/md_nvt/nvt_azobenzene_w4a8_mp_conservative \\
        --reference results/md_nvt/nvt_azobenzene_fp32_seed1 --noise-floor results/md_nvt/nvt_azobenzene_fp32_seed0 \\
        --skip-ps 10 --out results/md/sampling
writes OUT.png (histograms), OUT.json and OUT.md (the table). Bonds are those of the reference run's
first frame; --skip-ps drops the start of every run (equilibration). Every run must have a seed other than the
reference's: Langevin runs that share a seed share their random forces and stay alike (refused).
"""

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from ase import Atoms

from gaq_calc.md import read_trajectory, write_json_atomic
from gaq_calc.md.observables import observables, wasserstein
from gaq_calc.md.runner import phase_paths

UNITS = {"bond": "Å", "angle": "deg", "CNNC dihedral": "deg", "temperature": "K"}


def load_run(run_dir: Path, skip_ps: float):
    data, attrs = read_trajectory(
        phase_paths(run_dir, "trajectory")["h5"], names=("time_ps", "positions", "temperature")
    )
    keep = data["time_ps"] >= data["time_ps"][0] + skip_ps
    if keep.sum() < 10:
        raise SystemExit(f"error: {run_dir} has fewer than 10 frames after --skip-ps {skip_ps}")
    return (
        data["positions"][keep],
        data["temperature"][keep],
        np.asarray(attrs["numbers"]),
        float(data["time_ps"][keep][-1] - data["time_ps"][keep][0]),
        attrs.get("seed"),  # of the initial velocities and the thermostat noise
    )


def plot(samples: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    kinds = list(next(iter(samples.values())))
    fig = Figure(figsize=(4 * len(kinds), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(kinds))
    for ax, kind in zip(axes, kinds):
        pooled = {name: obs[kind].ravel() for name, obs in samples.items()}
        lo, hi = np.percentile(np.concatenate(list(pooled.values())), [0.1, 99.9])
        bins = np.linspace(lo, hi, 80)
        for name, values in pooled.items():
            ax.hist(values, bins=bins, density=True, histtype="step", label=name)
        ax.set_xlabel(f"{kind} ({UNITS[kind]})" + (" (all)" if kind in ("bond", "angle") else ""))
        ax.set_yticks([])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="NVT runs to compare with the reference")
    parser.add_argument("--reference", type=Path, required=True, help="the reference run (FP32)")
    parser.add_argument(
        "--noise-floor",
        type=Path,
        required=True,
        help="a second reference run with another seed: its distance is the noise floor",
    )
    parser.add_argument("--skip-ps", type=float, default=0.0, help="drop the first ps of every run")
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.png, .json, .md)")
    args = parser.parse_args(argv)
    if not args.skip_ps >= 0:
        parser.error("--skip-ps must be >= 0")

    runs = [args.reference, args.noise_floor, *args.run_dirs]
    if args.noise_floor.resolve() == args.reference.resolve():
        parser.error("--noise-floor must be a second reference run (another seed), not --reference itself")
    if len({run.name for run in runs}) < len(runs):
        parser.error("every run folder needs its own name (rows and histograms are labelled by it)")
    loaded = {run.name: load_run(run, args.skip_ps) for run in runs}
    # Langevin runs with the reference's seed share its start and its random forces, which keeps them close
    # to it for a long time: their distance would come out below the noise floor of independent runs
    ref_seed = loaded[args.reference.name][4]
    shared = [run.name for run in runs[1:] if ref_seed is not None and loaded[run.name][4] == ref_seed]
    if shared:
        parser.error(
            f"{', '.join(shared)} used the seed of --reference ({ref_seed}): the same thermostat noise makes "
            "runs look alike; compare runs with seeds other than the reference's"
        )
    ref_positions, _, numbers, *_ = loaded[args.reference.name]
    reference = Atoms(numbers=numbers, positions=ref_positions[0])
    samples = {}
    for name, (positions, temperature, run_numbers, *_) in loaded.items():
        if not np.array_equal(run_numbers, numbers):
            parser.error(f"{name} is not the same molecule as {args.reference.name}")
        samples[name] = observables(positions, temperature, reference)
    ref = samples[args.reference.name]
    floor = {kind: wasserstein(samples[args.noise_floor.name][kind], ref[kind]) for kind in ref}
    rows = []
    for name in [args.noise_floor.name] + [r.name for r in args.run_dirs]:
        distances = {kind: wasserstein(samples[name][kind], ref[kind]) for kind in ref}
        rows.append(
            {
                "run": name,
                "simulated_ps": loaded[name][3],
                "frames": len(loaded[name][0]),
                "w1": distances,
                # None where the floor is exactly 0 (two runs with identical samples: no noise to compare with)
                "ratio_to_noise_floor": {k: distances[k] / floor[k] if floor[k] > 0 else None for k in ref},
            }
        )
    record = {
        "command": shlex.join(["python", "md_protocols/sampling.py", *(sys.argv[1:] if argv is None else argv)]),
        "reference": args.reference.name,
        "reference_ps": loaded[args.reference.name][3],
        "noise_floor_run": args.noise_floor.name,
        "skip_ps": args.skip_ps,
        "units": UNITS,
        "rows": rows,
    }
    kinds = list(ref)
    lines = [
        f"`{record['command']}`",
        "",
        f"Wasserstein-1 distance to {args.reference.name} ({record['reference_ps']:.0f} ps), mean over the "
        "members of each kind; in brackets, the ratio to the noise floor (the first row, a second FP32 run "
        "with another seed). Target: every ratio <= 2.",
        "",
        "| run | simulated ps | " + " | ".join(f"{k} ({UNITS[k]})" for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['simulated_ps']:.0f} | "
            + " | ".join(f"{r['w1'][k]:.3g} ({_ratio(r['ratio_to_noise_floor'][k])})" for k in kinds)
            + " |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), record)
    tmp = args.out.with_name("." + args.out.name + ".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out.with_suffix(".md"))
    plot(samples, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
