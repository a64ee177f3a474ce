"""Molecular dynamics protocols (NVE, NVT) on ASE's integrators, with kill-safe HDF5 output.

The command-line programs are md_protocols/nve.py and md_protocols/nvt.py; this package is the
library they call: `run_nve` / `run_nvt` (protocols), `run_phase` (the loop), `energy_drift` and
`summarize_trajectory` (analysis), `StabilityMonitor` (blow-up checks), `TrajectoryWriter` (HDF5).
"""

from gaq_calc.md.analysis import (
    energy_drift,
    energy_drift_stderr,
    momenta_and_angular_momenta,
    plot_energies,
    plot_energy_comparison,
    summarize_trajectory,
)
from gaq_calc.md.dynamics import THERMOSTATS, make_dynamics, maxwell_boltzmann, zero_momenta
from gaq_calc.md.protocols import load_structure, run_nve, run_nvt
from gaq_calc.md.runner import CalculatorTimer, InputError, MDSettings, refresh_summary, run_phase
from gaq_calc.md.stability import BlowUp, StabilityMonitor
from gaq_calc.md.trajectory import (
    DiskFullError,
    RestartError,
    TrajectoryWriter,
    read_trajectory,
    write_json_atomic,
)

__all__ = [
    "THERMOSTATS",
    "BlowUp",
    "CalculatorTimer",
    "DiskFullError",
    "InputError",
    "MDSettings",
    "RestartError",
    "StabilityMonitor",
    "TrajectoryWriter",
    "energy_drift",
    "energy_drift_stderr",
    "load_structure",
    "make_dynamics",
    "maxwell_boltzmann",
    "momenta_and_angular_momenta",
    "plot_energies",
    "plot_energy_comparison",
    "read_trajectory",
    "refresh_summary",
    "run_nve",
    "run_nvt",
    "run_phase",
    "summarize_trajectory",
    "write_json_atomic",
    "zero_momenta",
]
