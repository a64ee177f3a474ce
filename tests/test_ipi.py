"""gaq-ipi against the real i-PI server: same energies and forces as a direct call, path-integral MD with
several clients, a client killed and replaced, a restart from i-PI's RESTART file. (The client's
command-line errors and its protocol without i-PI: tests/test_ipi_client.py.)

Every test bounds its waits with timeouts, stops every process it started (also on failure), and puts
its unix sockets in a short temporary folder (unix socket paths are limited to ~100 characters). The
tiny ethanol model of conftest.py keeps model calls negligible; what costs time is starting i-PI and
the clients (python + torch imports), seconds each on a shared 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units

from gaq_calc import GAQCalculator
from gaq_calc.md.protocols import load_structure

pytest.importorskip("ipi", reason="i-PI is not installed (pip install -e .[ipi], or .[test])")

REPO = Path(__file__).resolve().parents[1]
IPI = shutil.which("i-pi", path=str(Path(sys.executable).parent)) or shutil.which("i-pi")
if IPI is None:
    pytest.skip("the ipi package is installed but its i-pi program is not on PATH", allow_module_level=True)
START_TIMEOUT = 240  # seconds for i-PI plus the clients to start and run a short job on a loaded machine


@pytest.fixture
def sockets():
    """A short folder for unix sockets (/tmp/gqXXXXXX/), removed afterwards; i-PI's sockets_prefix."""
    folder = tempfile.mkdtemp(prefix="gq", dir="/tmp")
    yield folder + "/"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def processes():
    """Start processes through this list; all still running at the end are stopped, even on failure."""
    started: list[subprocess.Popen] = []

    def start(cmd, cwd, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")
            )
        proc.log = log
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def write_xyz(path: Path, atoms: Atoms) -> None:
    """A structure in i-PI's xyz convention (a molecule in a large unused box), readable by ASE too."""
    lines = [str(len(atoms)), "# CELL(abcABC): 30.0 30.0 30.0 90.0 90.0 90.0 cell{angstrom} positions{angstrom}"]
    lines += [f"{s} {x:.12f} {y:.12f} {z:.12f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    path.write_text("\n".join(lines) + "\n")


def write_input(
    folder: Path,
    sockets: str,
    *,
    steps: int,
    nbeads: int = 1,
    batch_size: int = 1,
    checkpoint: int = 1000,
    detail: bool = False,
    consolidate: bool = True,
) -> Path:
    """An i-PI input for the shipped ethanol: NVT (SVR for one bead, PILE-L for several) at 300 K, 0.5
    fs, printing the step and potential of every step in sim.out; with detail, also every bead's
    potential, positions and forces in sim.xf. Atomic units, every digit (i-PI's xyz trajectories keep
    only 6)."""
    atoms = load_structure("ethanol")
    thermostat = "pile_l" if nbeads > 1 else "svr"
    detail_fields = ["step", "bead_potentials"] + [
        f"atom_{q}(atom={i};bead={b})" for b in range(nbeads) for q in "xf" for i in range(len(atoms))
    ]
    detail_output = (
        f'<properties stride="1" flush="1" filename="xf">[ {", ".join(detail_fields)} ]</properties>' if detail else ""
    )
    xml = f"""<simulation verbosity="low" floatformat="%.16e" sockets_prefix="{sockets}">
  <output prefix="sim">
    <properties stride="1" flush="1" filename="out">[ step, potential ]</properties>
    {detail_output}
    <checkpoint stride="{checkpoint}"/>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name="gaq" mode="unix" pbc="false">
    <address>a</address>
    <batch_size>{batch_size}</batch_size>
    <consolidate_messages>{str(consolidate).lower()}</consolidate_messages>
  </ffsocket>
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="xyz">ethanol.xyz</file>
      <velocities mode="thermal" units="kelvin">300</velocities>
    </initialize>
    <forces><force forcefield="gaq"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">0.5</timestep>
        <thermostat mode="{thermostat}"><tau units="femtosecond">50</tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin">300</temperature></ensemble>
  </system>
</simulation>
"""
    folder.mkdir(parents=True, exist_ok=True)
    write_xyz(folder / "ethanol.xyz", atoms)
    (folder / "input.xml").write_text(xml)
    return folder / "input.xml"


def start_ipi(start, folder: Path, input_file: str = "input.xml", log: str = "ipi.log"):
    return start([IPI, input_file], folder, folder / log)


def start_client(start, folder: Path, sockets: str, model, log: str, *extra):
    cmd = [
        sys.executable,
        "-m",
        "gaq_calc.cli.ipi",
        "--model",
        str(model),
        "--unix",
        "a",
        "--sockets-prefix",
        sockets,
        "--structure",
        str(folder / "ethanol.xyz"),
        "--dtype",
        "float64",
        "--threads",
        "1",
        "--wait",
        "120",
        *extra,
    ]
    return start(cmd, REPO, folder / log)  # cwd: python -m finds this checkout's gaq_calc


def wait_until_waiting(*clients, timeout: float = START_TIMEOUT) -> None:
    """Until each client has loaded its model and polls for the server: started then, i-PI meets all
    of them at once, however long their start took on a busy machine."""
    deadline = time.monotonic() + timeout
    for client in clients:
        while "waiting up to" not in client.log.read_text():
            if client.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"client not ready (status {client.poll()}):\n{client.log.read_text()[-3000:]}")
            time.sleep(0.1)


def finish(proc, timeout: float = START_TIMEOUT) -> str:
    """Wait for a process to end with status 0; its log."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args[:3]} still running after {timeout} s:\n{proc.log.read_text()[-3000:]}")
    text = proc.log.read_text()
    assert rc == 0, f"{proc.args[:3]} exited with {rc}:\n{text[-3000:]}"
    return text


def structures_served(client_log: str) -> int:
    """From a client's last line: "... after N structures ..."."""
    return int(client_log.rsplit(" after ", 1)[1].split()[0])


def read_properties(path: Path) -> np.ndarray:
    return np.loadtxt(path, ndmin=2)


def wait_for_step(path: Path, step: int, proc, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            data = read_properties(path) if path.stat().st_size else np.zeros((0, 1))
            if len(data) and data[-1, 0] >= step:
                return
        if proc.poll() is not None:
            pytest.fail(f"i-PI ended before step {step}:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no step {step} after {timeout} s")


# ---- i-PI and gaq-ipi --------------------------------------------------------------------------


@pytest.mark.parametrize("nbeads, batch_size", [(1, 1), (4, 4)])
def test_ipi_gets_the_energies_and_forces_of_a_direct_call(
    tmp_path, sockets, processes, tiny_model_file, nbeads, batch_size
):
    """Classic protocol (one structure per request) and i-PI's batched one (4 beads in one request, one
    kernel call): what i-PI prints for every bead and step is what GAQCalculator gives for those
    positions, to float rounding (atomic units on both sides: no unit constant comes in between)."""
    steps = 3
    write_input(tmp_path, sockets, steps=steps, nbeads=nbeads, batch_size=batch_size, detail=True)
    client = start_client(processes, tmp_path, sockets, tiny_model_file, "client.log")
    ipi = start_ipi(processes, tmp_path)
    log = finish(client)
    finish(ipi)
    assert f"after {(steps + 1) * nbeads} structures" in log and "EXIT" in log
    assert (f"in batches of {batch_size}" in log) == (batch_size > 1)

    calc = GAQCalculator(tiny_model_file, dtype="float64")
    numbers = load_structure("ethanol").numbers
    n = len(numbers)
    rows = read_properties(tmp_path / "sim.xf")  # step, bead potentials, then per bead: positions, forces
    np.testing.assert_array_equal(rows[:, 0], np.arange(steps + 1))
    assert rows.shape[1] == 1 + nbeads + nbeads * 6 * n
    potentials = rows[:, 1 : 1 + nbeads] * units.Ha
    per_bead = rows[:, 1 + nbeads :].reshape(steps + 1, nbeads, 2, n, 3)
    positions, forces = per_bead[:, :, 0] * units.Bohr, per_bead[:, :, 1] * (units.Ha / units.Bohr)
    largest_force = 0.0
    for step in range(steps + 1):
        for bead in range(nbeads):
            atoms = Atoms(numbers=numbers, positions=positions[step, bead])
            atoms.calc = calc
            assert abs(potentials[step, bead] - atoms.get_potential_energy()) < 1e-9
            np.testing.assert_allclose(forces[step, bead], atoms.get_forces(), rtol=1e-9, atol=1e-12)
            largest_force = max(largest_force, np.abs(atoms.get_forces()).max())
    assert largest_force > 1e-5  # (a meaningful comparison: the tiny model's forces are small but not zero)
    if nbeads > 1:  # a real path integral: the beads differ, so each bead's forces were its own
        assert np.ptp(positions[-1], axis=0).max() > 1e-4


@pytest.mark.slow
def test_pimd_with_8_beads_and_2_clients_completes(tmp_path, sockets, processes, tiny_model_file):
    """8-bead path-integral MD (PILE-L) served by two gaq-ipi clients: every step is done and both
    clients share the work (~20 s: three process starts)."""
    steps = 20
    write_input(tmp_path, sockets, steps=steps, nbeads=8)
    clients = [start_client(processes, tmp_path, sockets, tiny_model_file, f"client{k}.log") for k in range(2)]
    wait_until_waiting(*clients)
    ipi = start_ipi(processes, tmp_path)
    logs = [finish(c) for c in clients]
    finish(ipi)
    np.testing.assert_array_equal(read_properties(tmp_path / "sim.out")[:, 0], np.arange(steps + 1))
    served = [structures_served(log) for log in logs]
    assert sum(served) == 8 * (steps + 1) and min(served) > 0, served


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop, consolidate, status",
    [
        (signal.SIGTERM, True, 143),  # i-PI's default exchange: the client closes its socket cleanly
        (signal.SIGKILL, False, -signal.SIGKILL),  # no clean close: i-PI's classic exchange copes with resets
    ],
)
def test_a_stopped_client_is_replaced_and_the_run_finishes(
    tmp_path, sockets, processes, tiny_model_file, stop, consolidate, status
):
    """Stop the only client of an 8-bead run mid-run: i-PI waits, keeps the lost request, and a new
    client finishes the run with every step (~30 s each)."""
    steps = 400
    write_input(tmp_path, sockets, steps=steps, nbeads=8, consolidate=consolidate)
    first = start_client(processes, tmp_path, sockets, tiny_model_file, "first.log")
    wait_until_waiting(first)
    ipi = start_ipi(processes, tmp_path)
    wait_for_step(tmp_path / "sim.out", 10, ipi)
    first.send_signal(stop)
    assert first.wait(30) == status, first.log.read_text()
    reached = read_properties(tmp_path / "sim.out")[-1, 0]
    assert reached < steps, "the run ended before the stop; make it longer"
    time.sleep(1.0)
    assert ipi.poll() is None, "i-PI must survive a lost client"
    assert read_properties(tmp_path / "sim.out")[-1, 0] == reached, "no client, so no progress"
    replacement = start_client(processes, tmp_path, sockets, tiny_model_file, "replacement.log")
    log = finish(replacement)
    finish(ipi)
    out = read_properties(tmp_path / "sim.out")
    np.testing.assert_array_equal(out[:, 0], np.arange(steps + 1))
    assert np.isfinite(out[:, 1]).all()
    assert structures_served(log) > 8 * (steps - reached - 1)  # (the first one may have done part of a step)


@pytest.mark.slow
def test_ipi_restart_file_resumes_the_run(tmp_path, sockets, processes, tiny_model_file):
    """Stop i-PI mid-run with SIGTERM (its soft exit writes RESTART), start `i-pi RESTART` with a new
    client: the run continues to its last step, and its potential energies are those of the same run
    done without a stop (~40 s: two i-PI runs)."""
    steps = 200
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    for folder in (reference, stopped):
        write_input(folder, sockets, steps=steps, checkpoint=5)
    client = start_client(processes, reference, sockets, tiny_model_file, "client.log")
    wait_until_waiting(client)
    ipi = start_ipi(processes, reference)
    finish(ipi)
    finish(client)
    expected = read_properties(reference / "sim.out")

    client = start_client(processes, stopped, sockets, tiny_model_file, "client.log")
    wait_until_waiting(client)
    ipi = start_ipi(processes, stopped)
    wait_for_step(stopped / "sim.out", 10, ipi)
    ipi.send_signal(signal.SIGTERM)
    finish(ipi, 60)
    finish(client, 60)  # i-PI's soft exit ends its clients too: status 0
    first = read_properties(stopped / "sim.out")
    assert first[-1, 0] < steps, "stopped after the end: make the run longer"
    assert (stopped / "RESTART").exists()

    client = start_client(processes, stopped, sockets, tiny_model_file, "client_restart.log")
    wait_until_waiting(client)
    ipi = start_ipi(processes, stopped, "RESTART", "ipi_restart.log")
    finish(ipi)
    finish(client)
    resumed = read_properties(stopped / "sim.out")  # i-PI appends to its outputs on a restart
    assert resumed[-1, 0] == steps and len(resumed) > len(first)
    by_step = {int(s): e for s, e in resumed}
    assert sorted(by_step) == list(range(steps + 1))
    # the same dynamics: positions, momenta and the thermostat's random state come back from RESTART
    for s, e in expected:
        assert abs(by_step[int(s)] - e) * units.Ha < 1e-9, (s, by_step[int(s)], e)
