"""gaq-nvt (= python md_protocols/nvt.py): NVT molecular dynamics with a gaq_calc model (Langevin, Bussi
or Nose-Hoover chain thermostat).

Example: gaq-nvt --model azobenzene_fp32 --thermostat bussi --time-ps 1000 --out runs/md/nvt
Writes OUT/trajectory.h5, OUT/summary.json, OUT/energies.png; see md_protocols/README.md. Never writes
into a folder holding files, except to continue its run with --restart.
"""

import argparse
import sys

from gaq_calc.cli.md_common import run_protocol
from gaq_calc.md.cli import (
    ArgumentParser,
    add_common_arguments,
    add_thermostat_arguments,
    check_arguments,
    run_main,
    settings_from_args,
)
from gaq_calc.md.protocols import run_nvt


def main(argv=None) -> int:
    parser = ArgumentParser(prog="gaq-nvt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_thermostat_arguments(parser)
    args = parser.parse_args(argv)

    def go() -> int:
        check_arguments(args)
        settings = settings_from_args(args, "nvt", args.thermostat, args.time_ps)
        return run_protocol(
            args,
            "nvt",
            lambda atoms, out, metadata: run_nvt(
                atoms, settings, out, restart=args.restart, progress=not args.no_progress, metadata=metadata
            ),
        )

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
