#!/usr/bin/env python
"""NVT molecular dynamics with a gaq_calc model (Langevin, Bussi or Nose-Hoover chain thermostat).

Example: python md_protocols/nvt.py --model azobenzene_fp32 --thermostat bussi --time-ps 1000 --out runs/md/nvt
Writes OUT/trajectory.h5, OUT/summary.json, OUT/energies.png; see md_protocols/README.md.
"""
import argparse
import sys

from gaq_calc.md.cli import (
    ArgumentParser, add_common_arguments, add_thermostat_arguments, check_arguments, report, run_main,
    settings_from_args, setup,
)
from gaq_calc.md.protocols import run_nvt


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_thermostat_arguments(parser)
    args = parser.parse_args(argv)

    def go() -> int:
        check_arguments(args)
        settings = settings_from_args(args, "nvt", args.thermostat, args.time_ps)
        atoms, out, metadata = setup(args, "nvt")
        summary = run_nvt(atoms, settings, out, restart=args.restart, progress=not args.no_progress,
                          metadata=metadata)
        return report(summary, out)

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
