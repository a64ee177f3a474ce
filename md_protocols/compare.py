#!/usr/bin/env python
"""Plot several runs on one figure: total energy per atom (relative to each run's start) and
temperature against time, labelled with each run's status and drift. Example:
    python md_protocols/compare.py results/md/nve_azobenzene_fp32 results/md/nve_azobenzene_w4a8_conservative \\
        --out results/md/energy_comparison.png
"""

import argparse
import sys
from pathlib import Path

from gaq_calc.md import plot_energy_comparison, read_trajectory
from gaq_calc.md.runner import phase_paths
from gaq_calc.md.trajectory import read_json


def run_label(run_dir: Path, summary: dict) -> str:
    status = str(summary.get("status", "?")).split(":")[0]  # completed, blow-up or interrupted
    drift = summary.get("energy_drift_meV_per_atom_per_ps")
    drift = "" if drift is None else f", drift {drift:.2g} meV/atom/ps"
    return f"{run_dir.name} ({status}, {summary.get('simulated_ps', 0):.0f} ps{drift})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="output folders of nve.py / nvt.py runs")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--phase", default="trajectory", help="trajectory (default) or equilibration")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    runs = []
    for run_dir in args.run_dirs:
        paths = phase_paths(run_dir, args.phase)
        data, attrs = read_trajectory(paths["h5"], names=("time_ps", "total_energy", "temperature"))
        summary = read_json(paths["summary"]) if paths["summary"].exists() else {}
        runs.append((run_label(run_dir, summary), data, len(attrs["numbers"])))
    plot_energy_comparison(runs, args.out, title=args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
