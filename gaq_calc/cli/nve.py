"""gaq-nve (= python md_protocols/nve.py): NVE molecular dynamics (velocity Verlet) with a gaq_calc model,
for energy-conservation tests.

Starts from Maxwell-Boltzmann velocities at --temperature (zero linear and angular momentum), then runs
--equilibrate-ps of NVT (recorded separately, not part of the drift) unless that is 0, then NVE.
Example (seconds): gaq-nve --model azobenzene_w4a8.pt --time-ps 1 --equilibrate-ps 0 --out runs/md/quick
Writes OUT/trajectory.h5, OUT/summary.json, OUT/energies.png; see md_protocols/README.md. Prints the
energy drift (meV/atom/ps) and the speed (ns/day). Never writes into a folder holding files, except to
continue its run with --restart.
"""

import argparse
import sys

from gaq_calc.cli.md_common import run_protocol
from gaq_calc.md.cli import (
    ArgumentParser,
    add_common_arguments,
    add_thermostat_arguments,
    check_arguments,
    nve_settings,
    run_main,
)
from gaq_calc.md.protocols import run_nve


def main(argv=None) -> int:
    parser = ArgumentParser(prog="gaq-nve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--equilibrate-ps",
        type=float,
        default=1.0,
        help="NVT equilibration before NVE, in ps (default 1; 0: start NVE from Maxwell-Boltzmann velocities)",
    )
    add_thermostat_arguments(parser, prefix="equilibrate-")
    args = parser.parse_args(argv)

    def go() -> int:
        check_arguments(args)
        settings, equilibration = nve_settings(args)
        return run_protocol(
            args,
            "nve",
            lambda atoms, out, metadata: run_nve(
                atoms,
                settings,
                out,
                equilibration=equilibration,
                restart=args.restart,
                progress=not args.no_progress,
                metadata=metadata,
            ),
        )

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
