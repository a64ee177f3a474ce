"""The NVT and NVE protocols: starting structure, initial velocities, optional equilibration, production.

Output folder layout (see md_protocols/README.md):
  trajectory.h5, checkpoint.json, summary.json, energies.png        production run
  equilibration.h5, equilibration_checkpoint.json,
  equilibration_summary.json, equilibration_energies.png            NVE only, with --equilibrate-ps > 0
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase import Atoms

from gaq_calc.md.dynamics import maxwell_boltzmann, zero_momenta
from gaq_calc.md.runner import MDSettings, check_fresh_start, has_saved_state, phase_paths, run_phase
from gaq_calc.md.trajectory import read_json, write_json_atomic

DEFAULT_MOLECULE = "azobenzene"


def load_structure(source: str | os.PathLike | None = None, index: int = 0) -> Atoms:
    """Starting structure: None -> frame `index` of the shipped rMD17 azobenzene training split; a shipped
    molecule name ("ethanol") -> that split's frame; otherwise any file ase.io.read can read.
    IndexError, saying how many frames there are, when `index` is not one of them (frames count from 0)."""
    from gaq_calc.data import read_frames

    index = int(index)
    if source is None or (not Path(source).exists() and Path(source).suffix == "" and "/" not in str(source)):
        name = str(source or DEFAULT_MOLECULE)
        frames = read_frames(name, "train")
        if not 0 <= index < len(frames.numbers):
            raise IndexError(
                f"no frame {index}: the shipped {name} training split has {len(frames.numbers)} frames, numbered from 0"
            )
        return Atoms(numbers=frames.numbers[index], positions=frames.positions[index])  # vacuum, no pbc
    from ase.io import read

    try:
        if index < 0:  # ase.io.read counts from the end, and for some indices past the start returns a frame
            raise IndexError
        atoms = read(str(source), index=index)
    except (IndexError, StopIteration):  # how ase.io.read says "no such frame", depending on the format
        n = len(read(str(source), index=":"))
        raise IndexError(f"no frame {index}: {source} has {n} frames, numbered from 0") from None
    atoms.calc = None  # drop stored labels: energies must come from the model
    return atoms


def run_nvt(
    atoms: Atoms,
    settings: MDSettings,
    out_dir: str | os.PathLike,
    *,
    restart: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> dict:
    """NVT from Maxwell-Boltzmann velocities at the target temperature (zero P and L, seeded by
    settings.seed). Writes trajectory.h5, checkpoint.json, summary.json, energies.png in out_dir."""
    if settings.ensemble != "nvt":
        raise ValueError("run_nvt needs settings.ensemble == 'nvt'")
    out = Path(out_dir)
    files = phase_paths(out, "trajectory")
    # on a restart the checkpoint overwrites these velocities; drawing them anyway keeps one code path
    maxwell_boltzmann(atoms, settings.temperature_K, np.random.default_rng(settings.seed))
    return run_phase(
        atoms,
        settings,
        out,
        name="trajectory",
        restart=restart,
        progress=progress,
        metadata=metadata,
        summary_path=files["summary"],
        plot_path=files["plot"],
        summary_extra={"start": "maxwell-boltzmann"},
    )


def run_nve(
    atoms: Atoms,
    settings: MDSettings,
    out_dir: str | os.PathLike,
    *,
    equilibration: MDSettings | None = None,
    restart: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> dict:
    """NVE (velocity Verlet) from Maxwell-Boltzmann velocities at settings.temperature_K, after an
    optional NVT equilibration (`equilibration`, an NVT MDSettings; None or n_steps = 0 skips it).

    The equilibration has its own trajectory and summary and does not enter the NVE drift. Its
    thermostat noise leaves non-zero total linear/angular momentum, which is removed before NVE
    starts, so that NVE conserves P = L = 0. The bonds watched for blow-ups are those of the input
    structure in both phases.
    """
    if settings.ensemble != "nve":
        raise ValueError("run_nve needs settings.ensemble == 'nve'")
    out = Path(out_dir)
    reference = atoms.copy()
    metadata = dict(metadata or {})
    equilibrate = equilibration is not None and equilibration.n_steps > 0
    eq_files, files = phase_paths(out, "equilibration"), phase_paths(out, "trajectory")
    eq_summary_path = eq_files["summary"]
    if not restart:  # before the equilibration writes anything
        check_fresh_start(out, "trajectory")
    # the production phase has a checkpoint or saved frames: the equilibration is over
    resume_production = restart and has_saved_state(out, "trajectory")
    eq_summary = None
    if resume_production:
        if eq_summary_path.exists():
            eq_summary = read_json(eq_summary_path)
    else:
        maxwell_boltzmann(atoms, settings.temperature_K, np.random.default_rng(settings.seed))
        if equilibrate:
            if equilibration.ensemble != "nvt":
                raise ValueError("the equilibration must be an NVT phase")
            eq_summary = run_phase(
                atoms,
                equilibration,
                out,
                name="equilibration",
                restart=restart,
                progress=progress,
                metadata=metadata,
                summary_path=eq_summary_path,
                plot_path=eq_files["plot"],
                reference=reference,
            )
            if eq_summary["status"] != "completed":
                summary = {
                    "status": f"{eq_summary['status']} (during equilibration)",
                    **metadata,
                    "n_steps": 0,
                    "equilibration": eq_summary,
                }
                write_json_atomic(files["summary"], summary)
                return summary
            zero_momenta(atoms)
    start = (
        f"NVT {equilibration.thermostat} equilibration, {equilibration.n_steps} steps, then zero P and L"
        if equilibrate
        else "maxwell-boltzmann"
    )
    return run_phase(
        atoms,
        settings,
        out,
        name="trajectory",
        restart=restart,
        progress=progress,
        metadata=metadata,
        summary_path=files["summary"],
        plot_path=files["plot"],
        reference=reference,
        summary_extra={"start": start, "equilibration": eq_summary},
    )
