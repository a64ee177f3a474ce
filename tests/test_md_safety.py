"""Data safety of the MD protocols (issue 18): a refused restart changes no file, saved frames and
checkpoints are never lost, bad input fails before anything is written with a one-line error, and a
full disk ends in a clear error with the saved frames intact.

Runs are a few tens of steps of the tiny untrained model; the command-line programs run in-process
(main(argv)) except where a real write failure needs a process of its own.
"""
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import write

from gaq_calc import GAQCalculator
from gaq_calc.md import MDSettings, RestartError, load_structure, read_trajectory, run_nve, run_nvt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_calc(tiny_model_file):
    return GAQCalculator(tiny_model_file, dtype="float64")


def ethanol(calc, frame=0):
    atoms = load_structure("ethanol", frame)
    atoms.calc = calc
    return atoms


def nve(n_steps, **kw) -> MDSettings:
    return MDSettings("nve", temperature_K=300.0, timestep_fs=0.5, n_steps=n_steps, log_every=5, seed=3, **kw)


def nvt(n_steps, thermostat="langevin", **kw) -> MDSettings:
    return MDSettings("nvt", thermostat, temperature_K=300.0, timestep_fs=0.5, n_steps=n_steps, log_every=5,
                      seed=3, taut_fs=5.0, **kw)


def files_state(folder) -> dict:
    """Every file under folder: its bytes and modification time (a refused restart changes neither)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def cli(script, argv, capsys):
    """main(argv) of md_protocols/<script> in-process: (exit status, stderr lines)."""
    main = runpy.run_path(str(REPO / "md_protocols" / script))["main"]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        status = main(argv)
    except SystemExit as err:  # argparse
        status = err.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return status, capsys.readouterr().err.strip().splitlines()


def cli_args(model, out, *extra):
    return ["--model", str(model), "--structure", "ethanol", "--dtype", "float64", "--log-every", "2",
            "--out", str(out), "--no-progress", *extra]


# ---- item 2: a restart must continue the same system ------------------------------------------

def _deuterate(atoms):
    masses = atoms.get_masses()
    masses[atoms.numbers == 1] = 2.014
    atoms.set_masses(masses)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.set_atomic_numbers([6, 8, 6, 1, 1, 1, 1, 1, 1]), "atomic numbers"),
    (_deuterate, "masses"),
    (lambda a: a.set_cell([12.0, 12.0, 12.0]), "cell"),
    (lambda a: (a.set_cell([12.0, 12.0, 12.0]), a.set_pbc(True)), "pbc"),
])
def test_restart_of_another_system_is_refused_and_changes_no_file(tmp_path, tiny_calc, change, message):
    """A completed run, extended with the same atom count but other chemistry (or masses, cell, pbc):
    refused before anything is written, so frames, checkpoint and the completed summary stay as they were."""
    assert run_nvt(ethanol(tiny_calc), nvt(10), tmp_path, progress=False)["status"] == "completed"
    before = files_state(tmp_path)
    other = ethanol(tiny_calc)
    change(other)
    with pytest.raises(RestartError, match=message):
        run_nvt(other, nvt(20), tmp_path, restart=True, progress=False)
    assert files_state(tmp_path) == before


def test_cli_restart_with_another_structure_exits_2_and_changes_no_file(tmp_path, tiny_model_file, capsys):
    other = load_structure("ethanol")
    other.set_atomic_numbers([6, 8, 6, 1, 1, 1, 1, 1, 1])  # same atom count, other molecule
    write(tmp_path / "other.extxyz", other)
    out = tmp_path / "run"
    assert cli("nvt.py", cli_args(tiny_model_file, out, "--time-ps", "0.004"), capsys)[0] == 0
    before = files_state(out)
    argv = cli_args(tiny_model_file, out, "--time-ps", "0.008", "--restart")
    argv[argv.index("ethanol")] = str(tmp_path / "other.extxyz")
    status, err = cli("nvt.py", argv, capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error:") and "atomic numbers" in err[0], err
    assert files_state(out) == before
