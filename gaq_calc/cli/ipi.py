"""gaq-ipi: serve energies and forces of a gaq_calc model to an i-PI server (classical or path-integral MD).

    i-pi input.xml &                                        # the server: dynamics, thermostats, output
    gaq-ipi --model azobenzene_w4a8.pt --unix gaq --wait 30   # a client: <ffsocket mode="unix"><address>gaq
    gaq-ipi --model azobenzene_w4a8.pt --host server.example.org --port 31415   # a client on another machine

Start as many clients as you like, anywhere the socket reaches: i-PI hands each a structure (a bead, a
replica) at a time, or a batch of them with <batch_size> in its <ffsocket>, which a client evaluates in
one kernel call. A client runs until i-PI says EXIT or goes away, and may be stopped (Ctrl-C, SIGTERM) and
replaced at any time: i-PI sends the lost request to another client. (Clients that may be SIGKILLed:
give i-PI's <ffsocket> <consolidate_messages>false</consolidate_messages>; see examples/ipi/README.md.)
--structure must hold the same atoms, in the same
order, as i-PI's input file (the file itself will do); its positions are not used.
Exit status: 0 when i-PI ends the run or goes away, 1 when the connection fails or a structure cannot
be served, 2 for bad input (model, structure, options).
"""

from __future__ import annotations

import argparse
import sys

from gaq_calc.ipi import DEFAULT_PORT, DEFAULT_SOCKETS_PREFIX
from gaq_calc.md.cli import add_model_arguments

EXIT_CONNECTION = 1
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is in --help)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gaq-ipi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser.add_argument_group("model"))
    g = parser.add_argument_group("structure template")
    g.add_argument(
        "--structure",
        default=None,
        help="ASE-readable file with the atoms in i-PI's order (i-PI's own xyz input will do), or a "
        "shipped rMD17 molecule name; default: the shipped azobenzene, as in the MD protocols",
    )
    g.add_argument("--frame", type=int, default=0, help="frame of --structure (default 0)")
    g = parser.add_argument_group("connection (one of --unix or --host/--port)")
    g.add_argument(
        "--unix",
        metavar="NAME",
        default=None,
        help='unix socket NAME: i-PI\'s <address> with mode="unix" (path: --sockets-prefix + NAME)',
    )
    g.add_argument(
        "--sockets-prefix",
        default=DEFAULT_SOCKETS_PREFIX,
        help=f"prefix of unix socket paths, as i-PI's sockets_prefix / -S (default {DEFAULT_SOCKETS_PREFIX})",
    )
    g.add_argument("--host", default=None, help='TCP: the machine running i-PI (mode="inet")')
    g.add_argument("--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    g.add_argument(
        "--wait", type=float, default=0.0, help="keep trying to connect for this many seconds (default 0: one try)"
    )
    g.add_argument("--verbose", action="store_true", help="trace the protocol's messages on stderr")
    return parser


def _say(text: str) -> None:
    print(f"gaq-ipi: {text}", file=sys.stderr, flush=True)


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that the socket is closed cleanly on the way out."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    import signal

    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # (a console program's own process state)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except _Terminated:
        _say("terminated (SIGTERM); i-PI gives this client's request to another one")
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.unix is not None and (args.host is not None or args.port is not None):
        parser.error("give either --unix NAME or --host/--port, not both")
    if args.unix is None and args.host is None and args.port is None:
        parser.error("give --unix NAME (i-PI on this machine) or --host HOST --port PORT")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 0 <= args.wait < float("inf"):
        parser.error(f"--wait must be a finite number of seconds >= 0, not {args.wait}")
    if args.frame < 0:
        parser.error(f"--frame must be >= 0, not {args.frame}")

    import torch

    from gaq_calc.calculator import GAQCalculator
    from gaq_calc.ipi import ProtocolError, connect, serve, socket_address
    from gaq_calc.md.protocols import load_structure
    from gaq_calc.model.serialization import ModelFileError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        _, _, where = socket_address(args.unix, args.host, args.port, args.sockets_prefix)
        template = load_structure(args.structure, args.frame)
        calc = GAQCalculator(args.model, device=args.device, dtype=args.dtype, mode=args.mode, kernel=args.kernel)
        calc.energies_and_forces([template])  # checks elements and geometry; builds the kernel on first use
    except (ValueError, OSError, IndexError, ModelFileError, RuntimeError) as err:
        print(f"gaq-ipi: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if any(template.pbc):
        _say("warning: the virial is sent as zero (no stress from this calculator): no constant-pressure runs")
    mode = f", {args.mode} mode" if calc.quantized else ""
    if args.wait > 0:
        _say(f"waiting up to {args.wait:g} s for i-PI at {where}")
    try:
        sock = connect(args.unix, args.host, args.port, args.sockets_prefix, args.wait)
    except ConnectionError as err:
        print(f"gaq-ipi: error: {err}", file=sys.stderr)
        return EXIT_CONNECTION
    _say(
        f"serving {calc.model_path.name} ({calc.kernel} kernel{mode}, {args.dtype}, "
        f"{torch.get_num_threads()} threads) for {len(template)} atoms to i-PI at {where}"
    )
    try:
        stats = serve(calc, template, sock, log=sys.stderr if args.verbose else None)
    except ProtocolError as err:
        print(f"gaq-ipi: error: {err}", file=sys.stderr)
        return EXIT_CONNECTION
    except (ValueError, FloatingPointError) as err:  # the model refused a structure i-PI sent
        print(f"gaq-ipi: error: structure from i-PI: {err}", file=sys.stderr)
        return EXIT_CONNECTION
    why = "i-PI ended the run (EXIT)" if stats.reason == "exit" else "i-PI closed the connection"
    batch = f" in batches of {stats.batch_size}" if stats.batch_size > 1 else ""
    _say(f"{why} after {stats.structures} structures{batch} ({stats.seconds_computing:.1f} s in the model); stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
