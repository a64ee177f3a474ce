"""What gaq-nve and gaq-nvt (and md_protocols/nve.py, nvt.py, the same programs) share beyond
gaq_calc.md.cli: the refusal to write into a folder that holds data, and the one-line result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def refuse_existing_output(out: Path, restart: bool) -> bool:
    """Users never lose data: without --restart, a non-empty output folder is refused (one line on
    stderr, True) before anything is written. The runner refuses an existing trajectory too; this check
    comes first, covers every file, and fails before the model is loaded when --out is given."""
    if restart or not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    what = "is a file" if not out.is_dir() else "already holds files (an earlier run?)"
    print(f"error: output folder {out} {what}; continue that run with --restart, or give a new --out", file=sys.stderr)
    return True


def headline(summary: dict, ensemble: str) -> str:
    """One line: simulated time, energy drift in meV/atom/ps (with its standard error) and ns/day."""
    drift = summary.get("energy_drift_meV_per_atom_per_ps")
    error = summary.get("energy_drift_stderr_meV_per_atom_per_ps")
    drift_text = "n/a" if drift is None else f"{drift:.3g}" + ("" if error is None else f" +- {error:.2g}")
    label = "energy drift" if ensemble == "nve" else "energy drift (thermostatted, not a conservation test)"
    speed = summary.get("ns_per_day")
    speed_text = "n/a" if speed is None else f"{speed:.3g}"
    return (
        f"{ensemble.upper()} {summary.get('simulated_ps')} ps: {label} {drift_text} meV/atom/ps, "
        f"{speed_text} ns/day, mean T {summary.get('mean_temperature_K', float('nan')):.0f} K "
        f"({summary.get('status')})"
    )


def run_protocol(args, protocol: str, run: Callable) -> int:
    """The shared body of gaq-nve and gaq-nvt: refuse a used output folder (before the model loads when
    --out is given, else once setup has named the folder), set up, run(atoms, out, metadata) -> summary,
    report it and print the one-line result. Returns the exit status."""
    from gaq_calc.md.cli import EXIT_USAGE, report, setup

    if args.out and refuse_existing_output(Path(args.out), args.restart):
        return EXIT_USAGE
    atoms, out, metadata = setup(args, protocol)
    if refuse_existing_output(out, args.restart):
        return EXIT_USAGE
    summary = run(atoms, out, metadata)
    status = report(summary, out)
    print(headline(summary, protocol))
    return status
