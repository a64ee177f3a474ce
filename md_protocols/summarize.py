#!/usr/bin/env python
"""Recompute the analysis fields (drift, its standard error, energy and temperature statistics,
momentum drift) and the energy plot of finished or stopped runs from their HDF5 trajectories with the
current analysis code. Status, timing and settings in summary.json are kept. Example:
    python md_protocols/summarize.py results/md/nve_azobenzene_fp32 results/md/nve_azobenzene_w4a8_conservative
"""

import argparse
import sys

from gaq_calc.md.runner import refresh_summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="output folders of nve.py / nvt.py runs")
    parser.add_argument("--phase", default="trajectory", help="trajectory (default) or equilibration")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        s = refresh_summary(run_dir, args.phase)
        print(
            f"{run_dir}: {s.get('simulated_ps')} ps, drift {s.get('energy_drift_meV_per_atom_per_ps')} "
            f"+- {s.get('energy_drift_stderr_meV_per_atom_per_ps')} meV/atom/ps"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
