"""Serve a GAQCalculator to an i-PI server over its socket protocol (the `gaq-ipi` client's library).

i-PI (https://ipi-code.org) integrates the dynamics (classical or path-integral, thermostats, restarts)
and sends structures to its clients over a unix or TCP socket; each client returns energies and
forces. The messages are framed with ASE's implementation of the protocol
(`ase.calculators.socketio.IPIProtocol`), so this module needs ASE only, not i-PI.

ASE's own `SocketClient` is not used because it cannot do three things a client here needs: connect to
a unix socket outside /tmp/ipi_* (i-PI's `sockets_prefix`), receive i-PI's INIT handshake, and speak
i-PI's batched exchange. With `<ffsocket><batch_size>N</batch_size>` (i-PI >= 3.3), i-PI announces
"batch_size:N" in INIT and then sends N structures per request (one atom count, N cell blocks, then N
position blocks) and expects N energies, forces, virials and extra strings back; this client evaluates
them in one kernel call (`GAQCalculator.energies_and_forces`). With the default batch size 1 it speaks
the classic protocol: one structure per request.

Units on the wire are atomic (Bohr, Hartree); the model works in Å and eV. The virial is sent as zero:
the calculator computes no stress, so constant-pressure runs are not supported.

A client may be stopped at any time: i-PI re-queues its request for another client. i-PI 3.3.1's default
exchange (consolidate_messages) survives that only when the client's socket ends cleanly, not when it
is reset, which happens if the client dies with data unread. So the client reads a GETFORCE that came
with the positions before it computes (`_take_if_waiting`), and drains its socket when it stops for
any reason (`close_cleanly`: EXIT, errors, Ctrl-C, SIGTERM). A SIGKILL can still land while data is
unread; runs whose clients may die that way should set <consolidate_messages>false</consolidate_messages>,
whose exchange i-PI keeps running through resets (tested).
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units
from ase.calculators.socketio import IPIProtocol, SocketClosed

DEFAULT_SOCKETS_PREFIX = "/tmp/ipi_"  # i-PI's default prefix of unix socket paths
DEFAULT_PORT = 31415  # i-PI's default TCP port


class ProtocolError(RuntimeError):
    """The server sent something this client cannot serve (a wrong atom count, an unknown message)."""


@dataclass
class ServeStats:
    """What a serve() call did: why it stopped, how many requests and structures it answered."""

    reason: str = ""  # "exit" (i-PI said EXIT) or "closed" (the server went away)
    requests: int = 0
    structures: int = 0
    batch_size: int = 1
    replica_index: int | None = None  # the bead/replica index i-PI sent in INIT
    seconds_computing: float = 0.0
    init_string: str = field(default="", repr=False)


def socket_address(
    unix: str | None = None,
    host: str | None = None,
    port: int | None = None,
    sockets_prefix: str = DEFAULT_SOCKETS_PREFIX,
) -> tuple[int, object, str]:
    """(address family, address, description) of i-PI's socket: unix NAME -> sockets_prefix + NAME
    (i-PI's convention), otherwise TCP host:port."""
    if unix is not None:
        if not unix:
            raise ValueError("the unix socket name is empty")
        path = sockets_prefix + unix
        return socket.AF_UNIX, path, f"unix socket {path}"
    host = host or "localhost"
    port = DEFAULT_PORT if port is None else int(port)
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, not {port}")
    return socket.AF_INET, (host, port), f"{host}:{port} (TCP)"


def connect(
    unix: str | None = None,
    host: str | None = None,
    port: int | None = None,
    sockets_prefix: str = DEFAULT_SOCKETS_PREFIX,
    wait: float = 0.0,
) -> socket.socket:
    """A socket connected to i-PI, retrying for up to `wait` seconds while the server is not there yet
    (i-PI takes a moment to open its socket). ConnectionError with a one-line reason otherwise."""
    family, address, where = socket_address(unix, host, port, sockets_prefix)
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            break
        except socket.gaierror as err:  # unknown host: waiting does not help
            sock.close()
            raise ConnectionError(f"cannot connect to i-PI at {where}: {err.strerror or err}") from None
        except OSError as err:
            sock.close()
            if time.monotonic() >= deadline:
                hint = (
                    ' (is i-PI running, with this <address> and mode="unix"?)'
                    if family == socket.AF_UNIX
                    else ' (is i-PI running, with this <address> and <port> and mode="inet"?)'
                )
                raise ConnectionError(f"cannot connect to i-PI at {where}: {err.strerror or err}{hint}") from None
            time.sleep(0.25)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the protocol's messages are small
    return sock


def _batch_size(init: bytes) -> int:
    """The batch size i-PI announces in its INIT string ("..., batch_size:N"); 1 if none."""
    text = bytes(init).decode("utf-8", errors="replace")
    for token in text.replace(",", " ").split():
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                return max(1, int(value))
            except ValueError:
                raise ProtocolError(f"i-PI sent an unreadable batch size in INIT: {token!r}") from None
    return 1


def _read_positions(protocol: IPIProtocol, batch: int, n_expected: int) -> tuple[np.ndarray, np.ndarray]:
    """The rest of a POSDATA message: cells [batch, 3, 3] (rows are cell vectors) and positions
    [batch, N, 3], in Å. Classic layout (batch 1): h, h^-1, N, positions. Batched layout (i-PI >= 3.3):
    N, batch x (h, h^-1), batch x positions. i-PI's h has the cell vectors as columns. The atom count
    is checked before the positions are read."""
    if batch == 1:
        h = protocol.recv((1, 2, 3, 3), np.float64)[:, 0]
        n_atoms = int(protocol.recv(1, np.int32)[0])
    else:
        n_atoms = int(protocol.recv(1, np.int32)[0])
    if n_atoms != n_expected:
        raise ProtocolError(
            f"i-PI sent {n_atoms} atoms, but the structure template has {n_expected}: --structure must hold the "
            "same atoms, in the same order, as i-PI's input file"
        )
    if batch > 1:
        h = protocol.recv((batch, 2, 3, 3), np.float64)[:, 0]
    positions = protocol.recv((batch, n_atoms, 3), np.float64) * units.Bohr
    return np.transpose(h, (0, 2, 1)) * units.Bohr, positions


class _Replicas:
    """Copies of the template that receive i-PI's positions (and cell, for a periodic template)."""

    def __init__(self, template: Atoms):
        self.template = template.copy()
        self.template.calc = None
        self.periodic = bool(np.any(template.pbc))
        self.copies: list[Atoms] = []

    def fill(self, cells: np.ndarray, positions: np.ndarray) -> list[Atoms]:
        """cells [n, 3, 3] (rows are cell vectors, Å), positions [n, N, 3] (Å)."""
        while len(self.copies) < len(positions):
            self.copies.append(self.template.copy())
        for atoms, cell, pos in zip(self.copies, cells, positions):
            atoms.positions[:] = pos
            if self.periodic:
                atoms.cell[:] = cell
        return self.copies[: len(positions)]


def _take_if_waiting(sock: socket.socket, message: str) -> bool:
    """Read `message` now if it is already on the socket (without blocking); True if it was.

    i-PI (3.3, consolidate_messages, its default) sends POSDATA and GETFORCE in one write. Reading the
    GETFORCE header before computing leaves nothing unread while the model runs, so a client killed
    then closes its socket with an orderly end of stream, which i-PI handles (it re-queues the
    request). Data left unread makes the kernel reset the connection instead, and i-PI 3.3.1's
    consolidated receive path does not catch that ConnectionResetError: its polling thread dies and
    the run hangs. Whether the header is read now or after the computation, the bytes on the wire
    are the same."""
    flags = getattr(socket, "MSG_DONTWAIT", 0)
    if not flags:
        return False
    header = message.encode("ascii").ljust(12)
    try:
        waiting = sock.recv(len(header), socket.MSG_PEEK | flags)
    except (BlockingIOError, InterruptedError):
        return False
    if waiting != header:
        return False
    sock.recv(len(header), socket.MSG_WAITALL)
    return True


def serve(calc, template: Atoms, sock: socket.socket, log=None) -> ServeStats:
    """Answer i-PI's requests on a connected socket with calc (a GAQCalculator) until i-PI says EXIT
    (reason "exit") or closes the connection (reason "closed"). The template gives the atoms' elements
    and order, and pbc (a non-periodic template ignores i-PI's cell). log: a file for a message trace.

    Raises ProtocolError for a request this client cannot serve, and the calculator's ValueError or
    FloatingPointError for a structure the model refuses (overlapping atoms, non-finite output)."""
    protocol = IPIProtocol(sock, txt=log)
    replicas = _Replicas(template)
    stats = ServeStats()
    state = "NEEDINIT"  # asking for INIT is how a client learns the replica index and the batch size
    energies = forces = None
    try:
        while True:
            try:
                msg = protocol.recvmsg()
            except (SocketClosed, ConnectionError):
                stats.reason = "closed"
                return stats
            if msg == "EXIT":
                stats.reason = "exit"
                return stats
            if msg == "STATUS":
                protocol.sendmsg(state)
            elif msg == "INIT":
                index, init = protocol.recvinit()
                stats.replica_index = int(np.ravel(index)[0])
                stats.init_string = bytes(init).decode("utf-8", errors="replace")
                stats.batch_size = _batch_size(init)
                state = "READY"
            elif msg == "POSDATA":
                if state != "READY":
                    raise ProtocolError(f"i-PI sent positions while this client was in state {state}")
                cells, positions = _read_positions(protocol, stats.batch_size, len(template))
                structures = replicas.fill(cells, positions)
                asked = _take_if_waiting(sock, "GETFORCE")
                if asked:
                    protocol.log("  recvmsg 'GETFORCE' (read before computing)")
                t0 = time.perf_counter()
                energies, forces = calc.energies_and_forces(structures)
                stats.seconds_computing += time.perf_counter() - t0
                state = "HAVEDATA"
                if asked:
                    _send_results(protocol, stats, energies, forces)
                    state = "READY"
            elif msg == "GETFORCE":
                if state != "HAVEDATA":
                    raise ProtocolError(f"i-PI asked for forces while this client was in state {state}")
                _send_results(protocol, stats, energies, forces)
                state = "READY"
            else:
                raise ProtocolError(f"unexpected message {msg!r} from the server")
    except (BrokenPipeError, ConnectionResetError, SocketClosed):  # gone while we were answering
        stats.reason = "closed"
        return stats
    finally:
        close_cleanly(sock)


def close_cleanly(sock: socket.socket) -> None:
    """Close so that i-PI sees an orderly end of stream, whatever stopped the client (EXIT, an error,
    Ctrl-C, SIGTERM): stop receiving, read what is still queued, then close. A socket closed with
    unread data is reset instead, which i-PI 3.3.1's default exchange does not survive (see
    `_take_if_waiting`); i-PI re-queues the request of a client that ends cleanly."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    try:
        sock.setblocking(False)
        while sock.recv(65536):
            pass
    except OSError:  # nothing left (BlockingIOError), or the server is gone
        pass
    sock.close()


def _send_results(protocol: IPIProtocol, stats: ServeStats, energies: np.ndarray, forces: list) -> None:
    """FORCEREADY and the results: one structure (ASE converts eV, Å to Ha, Bohr), or i-PI's batched
    layout (energies, atom count, forces, virials, extra-string lengths; each for all structures)."""
    n = len(energies)
    if stats.batch_size == 1:
        protocol.sendforce(energies[0], forces[0], np.zeros((3, 3)))
    else:
        protocol.sendmsg("FORCEREADY")
        protocol.send(energies / units.Ha, np.float64)
        protocol.send(len(forces[0]), np.int32)
        protocol.send(np.stack(forces) * (units.Bohr / units.Ha), np.float64)
        protocol.send(np.zeros((n, 3, 3)), np.float64)  # virials: no stress from this calculator
        protocol.send(np.zeros(n), np.int32)  # no extra strings
    stats.requests += 1
    stats.structures += n
