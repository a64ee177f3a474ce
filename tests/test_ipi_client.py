"""gaq_calc.ipi.serve in-process, against a scripted server on a socket pair (no i-PI needed): the classic
and the batched exchange, a wrong atom count, a server that goes away; and gaq-ipi's command-line
errors. tests/test_ipi.py runs the real i-PI."""

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.calculators.socketio import IPIProtocol

from gaq_calc import GAQCalculator
from gaq_calc.ipi import ProtocolError, serve
from gaq_calc.md.protocols import load_structure

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sockets():
    """A short folder for unix socket paths (/tmp/gqXXXXXX/), removed afterwards."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gq", dir="/tmp")
    yield folder + "/"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def calc(tiny_model_file):
    return GAQCalculator(tiny_model_file, dtype="float64")


class Client:
    """serve() in a thread on one end of a socket pair; the test plays the server on the other end."""

    def __init__(self, calc, template):
        self.server_sock, client_sock = socket.socketpair()
        self.server = IPIProtocol(self.server_sock)
        self.result = {}

        def run():
            try:
                self.result["stats"] = serve(calc, template, client_sock)
            except Exception as err:
                self.result["error"] = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def init(self, text: str = "") -> None:
        assert self.server.status() == "NEEDINIT"
        self.server.sendmsg("INIT")
        self.server.send(3, np.int32)  # replica index
        data = text.encode() or b"\0"
        self.server.send(len(data), np.int32)
        self.server.socket.sendall(data)
        assert self.server.status() == "READY"

    def finish(self):
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.server_sock.close()
        return self.result


def _structures(n):
    rng = np.random.default_rng(0)
    base = load_structure("ethanol")
    out = []
    for _ in range(n):
        atoms = base.copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(atoms)
    return out


def test_classic_exchange_gives_the_calculators_numbers(calc):
    template = load_structure("ethanol")
    client = Client(calc, template)
    client.init()
    for atoms in _structures(2):
        results = client.server.calculate(atoms.positions, np.eye(3) * 20.0)  # ASE's server side, Å and eV
        atoms.calc = calc
        assert abs(results["energy"] - atoms.get_potential_energy()) < 1e-9
        np.testing.assert_allclose(results["forces"], atoms.get_forces(), rtol=1e-12, atol=1e-14)
        assert not results["virial"].any()
    client.server.end()
    stats = client.finish()["stats"]
    assert (stats.reason, stats.structures, stats.batch_size, stats.replica_index) == ("exit", 2, 1, 3)


def test_batched_exchange_is_one_call_for_the_whole_batch(calc):
    """i-PI's batched layout (announced by 'batch_size:N' in INIT), with POSDATA and GETFORCE sent in
    one write as i-PI does; the client answers N results from one kernel call."""
    template = load_structure("ethanol")
    calls = []
    inner = calc.energy_forces
    calc.energy_forces = lambda *args: calls.append(args[-1]) or inner(*args)
    client = Client(calc, template)
    client.init("some,params, batch_size:3")
    structures = _structures(3)
    n = len(template)
    h = np.eye(3) * 20.0 / units.Bohr
    payload = b"POSDATA".ljust(12) + np.int32(n).tobytes()
    payload += (np.stack([h, np.linalg.inv(h)] * 3)).tobytes()
    payload += np.stack([a.positions / units.Bohr for a in structures]).tobytes()
    client.server_sock.sendall(payload + b"GETFORCE".ljust(12))
    assert client.server.recvmsg() == "FORCEREADY"
    energies = client.server.recv(3, np.float64) * units.Ha
    assert client.server.recv(1, np.int32)[0] == n
    forces = client.server.recv((3, n, 3), np.float64) * (units.Ha / units.Bohr)
    assert not client.server.recv((3, 3, 3), np.float64).any()
    assert not client.server.recv(3, np.int32).any()  # no extra strings
    client.server_sock.close()  # the server goes away: a clean end
    stats = client.finish()["stats"]
    assert (stats.reason, stats.structures, stats.batch_size) == ("closed", 3, 3)
    assert calls == [3]
    for atoms, e, f in zip(structures, energies, forces):
        atoms.calc = calc
        assert abs(e - atoms.get_potential_energy()) < 1e-9
        np.testing.assert_allclose(f, atoms.get_forces(), rtol=1e-12, atol=1e-14)


def test_a_wrong_atom_count_is_a_protocol_error(calc):
    client = Client(calc, load_structure("ethanol"))
    client.init()
    # One write, as i-PI does: the client may refuse (and close) as soon as it reads the count, so a
    # second write of the positions would race it into a broken pipe.
    h = np.eye(3) * 20.0 / units.Bohr
    payload = b"POSDATA".ljust(12) + h.tobytes() + np.linalg.inv(h).tobytes() + np.int32(5).tobytes()
    client.server_sock.sendall(payload + np.zeros((5, 3)).tobytes())
    error = client.finish()["error"]
    assert isinstance(error, ProtocolError) and "sent 5 atoms" in str(error) and "has 9" in str(error)


def test_a_message_out_of_turn_is_a_protocol_error(calc):
    client = Client(calc, load_structure("ethanol"))
    client.init()
    client.server.sendmsg("GETFORCE")  # no positions yet
    assert "asked for forces" in str(client.finish()["error"])


# ---- gaq-ipi's command line --------------------------------------------------------------------


def test_client_reports_a_missing_server_in_one_line(tiny_model_file, capsys, sockets):
    from gaq_calc.cli.ipi import main

    common = ["--model", str(tiny_model_file), "--structure", "ethanol"]
    assert main(common + ["--unix", "nobody", "--sockets-prefix", sockets]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot connect to i-PI at unix socket" in err and "Traceback" not in err
    with socket_bound() as port:  # a TCP port nobody listens on
        assert main(common + ["--host", "127.0.0.1", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "refused" in err.lower()


def test_client_refuses_bad_input_in_one_line(tiny_model_file, capsys, tmp_path):
    from gaq_calc.cli.ipi import main

    for argv in (
        ["--unix", "a", "--host", "h"],
        [],
        ["--unix", "a", "--wait", "nan"],
        ["--unix", "a", "--frame", "-1"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(tiny_model_file), *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gaq-ipi: error: "), err
    assert main(["--model", str(tiny_model_file), "--host", "localhost", "--port", "70000"]) == 2
    assert "port must be in 1..65535" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing.pt"), "--unix", "a"]) == 2
    assert main(["--model", str(tiny_model_file), "--unix", "a", "--structure", str(tmp_path / "none.xyz")]) == 2
    load_structure("azobenzene").write(tmp_path / "azo.xyz")  # nitrogen: not in the tiny model
    assert main(["--model", str(tiny_model_file), "--unix", "a", "--structure", str(tmp_path / "azo.xyz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("gaq-ipi: error: ") for line in lines), lines
    assert "not known to this model" in lines[2]


def test_console_scripts_are_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for script, target in [
        ("gaq-ipi", "gaq_calc.cli.ipi:main"),
        ("gaq-nve", "gaq_calc.cli.nve:main"),
        ("gaq-nvt", "gaq_calc.cli.nvt:main"),
    ]:
        assert project["scripts"][script] == target
    assert any(dep.startswith("ipi") for dep in project["optional-dependencies"]["ipi"])  # the [ipi] extra


class socket_bound:
    """A free TCP port, bound (so nobody else takes it) but not listening: connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()
