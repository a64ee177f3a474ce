"""Command-line plumbing shared by md_protocols/nve.py and md_protocols/nvt.py.

Process-wide settings (torch threads, the SIGTERM handler) are set here, by the programs, and never by
the library modules, which may run inside someone else's process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import signal
import sys
from pathlib import Path

from gaq_calc.calculator import KERNELS
from gaq_calc.md.dynamics import THERMOSTATS
from gaq_calc.md.runner import InputError, MDSettings, RestartError
from gaq_calc.quant import MODES

EXIT_WRITE_ERROR = 1  # a write failed (disk full): frames up to the checkpoint are kept
EXIT_USAGE = 2  # bad arguments or input, or a refused (re)start: nothing was written
EXIT_BLOW_UP = 3
EXIT_INTERRUPTED = 130

#: Allowed values of the numeric options (argparse dest, test, requirement); every value must also be
#: finite. Checked before anything runs, so that a bad value never starts a run that fails later.
LIMITS = (
    ("temperature", lambda v: v >= 0, ">= 0 K"),
    ("timestep", lambda v: v > 0, "> 0 fs"),
    ("time_ps", lambda v: v >= 0, ">= 0 ps"),
    ("equilibrate_ps", lambda v: v >= 0, ">= 0 ps"),
    ("friction", lambda v: v >= 0, ">= 0 1/fs"),
    ("taut", lambda v: v > 0, "> 0 fs"),
    ("tchain", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("frame", lambda v: v >= 0, ">= 0"),
    ("threads", lambda v: v >= 1, ">= 1"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("flush_every", lambda v: v >= 1, ">= 1"),
    ("flush_seconds", lambda v: v >= 0, ">= 0 s"),
    ("max_temperature", lambda v: v > 0, "> 0 K"),
    ("bond_tolerance", lambda v: v > 0, "> 0 Å"),
)


class UsageError(ValueError):
    """A bad command-line value, reported in one line before anything runs."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the programs' own (the usage is in --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def check_arguments(args) -> None:
    """Raise UsageError for the first option outside its LIMITS (options a program lacks are skipped)."""
    for name, ok, need in LIMITS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number {need}, not {value}")


def add_model_arguments(g) -> None:
    """The model options of every program that drives a GAQCalculator (gaq-nve, gaq-nvt, gaq-ipi)."""
    g.add_argument(
        "--model",
        default="azobenzene_fp32",
        help="shipped model name (e.g. azobenzene_fp32), model folder, model file or artifact (azobenzene_w4a8.pt)",
    )
    g.add_argument(
        "--mode",
        default="conservative",
        choices=MODES,
        help="quantized models: conservative (default; activations not rounded, forces exact "
        "gradients, energy conserved) or quantized (8-bit activations as trained; forces are "
        "straight-through gradients of an energy with jumps)",
    )
    g.add_argument(
        "--kernel",
        default="auto",
        choices=KERNELS,
        help="calculator kernel (default auto: the fused C++ kernel where it applies)",
    )
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="network precision")
    g.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's choice; give 1 when several processes share a machine)",
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser.add_argument_group("model"))
    g = parser.add_argument_group("structure")
    g.add_argument(
        "--structure",
        default=None,
        help="starting structure: any ASE-readable file, or a shipped rMD17 molecule name "
        "(default: first training frame of the shipped rMD17 azobenzene split)",
    )
    g.add_argument("--frame", type=int, default=0, help="frame of --structure to start from (default 0)")
    g = parser.add_argument_group("dynamics")
    g.add_argument("--temperature", type=float, default=300.0, help="temperature in K (default 300)")
    g.add_argument("--timestep", type=float, default=0.5, help="time step in fs (default 0.5)")
    g.add_argument(
        "--time-ps", type=float, default=1000.0, help="simulated time of the production run in ps (default 1000 = 1 ns)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of initial velocities and thermostat noise")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default runs/md/<protocol>_<model>)")
    g.add_argument(
        "--log-every", type=int, default=20, help="steps between saved frames and blow-up checks (default 20)"
    )
    g.add_argument(
        "--flush-every", type=int, default=50, help="saved frames between HDF5 flushes and checkpoints (default 50)"
    )
    g.add_argument(
        "--flush-seconds", type=float, default=30.0, help="at most this many seconds between flushes (default 30)"
    )
    g.add_argument(
        "--restart",
        action="store_true",
        help="continue the run in --out from its last checkpoint, or from its last saved frame "
        "when the checkpoint is lost (or start it if there is neither)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("blow-up detection")
    g.add_argument(
        "--max-temperature",
        type=float,
        default=None,
        help="stop above this temperature in K (default max(5 x --temperature, 2000))",
    )
    g.add_argument(
        "--bond-tolerance",
        type=float,
        default=0.5,
        help="stop when a bond deviates more than this (Å) from its starting length (default 0.5)",
    )


def add_thermostat_arguments(
    parser: argparse.ArgumentParser, prefix: str = "", default: str = "langevin", choices=THERMOSTATS
) -> None:
    g = parser.add_argument_group("thermostat")
    g.add_argument(f"--{prefix}thermostat", default=default, choices=choices, help=f"(default {default})")
    g.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs (default 0.01)")
    g.add_argument(
        "--taut", type=float, default=100.0, help="Bussi time constant / Nose-Hoover damping time in fs (default 100)"
    )
    g.add_argument("--tchain", type=int, default=3, help="Nose-Hoover chain length (default 3)")


def n_steps(time_ps: float, timestep_fs: float) -> int:
    return round(time_ps * 1000.0 / timestep_fs)


def settings_from_args(args, ensemble: str, thermostat: str | None, time_ps: float) -> MDSettings:
    return MDSettings(
        ensemble=ensemble,
        thermostat=thermostat,
        temperature_K=args.temperature,
        timestep_fs=args.timestep,
        n_steps=n_steps(time_ps, args.timestep),
        log_every=args.log_every,
        seed=args.seed,
        friction_per_fs=args.friction,
        taut_fs=args.taut,
        tchain=args.tchain,
        max_temperature_K=args.max_temperature,
        bond_tolerance_A=args.bond_tolerance,
        flush_every=args.flush_every,
        flush_seconds=args.flush_seconds,
    )


def nve_settings(args) -> tuple[MDSettings, MDSettings]:
    """(NVE production, NVT equilibration) settings of gaq-nve's options (--time-ps, --equilibrate-ps,
    --equilibrate-thermostat and the common ones): one place, so every NVE program runs the same protocol."""
    production = settings_from_args(args, "nve", None, args.time_ps)
    equilibration = dataclasses.replace(
        settings_from_args(args, "nvt", args.equilibrate_thermostat, args.equilibrate_ps),
        n_steps=n_steps(args.equilibrate_ps, args.timestep),
    )
    return production, equilibration


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_phase, which flushes and writes the summary


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM ends an MD program the way Ctrl-C does: the running phase flushes its frames and writes its
    summary (status "interrupted") on the way out. For programs' main(), not library code."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def setup(args, protocol: str):
    """Structure, threads, SIGTERM handling and calculator. Returns (atoms, out_dir, metadata).
    A structure or model that cannot be loaded is a UsageError."""
    import torch

    from gaq_calc.calculator import GAQCalculator
    from gaq_calc.md.protocols import load_structure
    from gaq_calc.model.serialization import ModelFileError

    try:
        atoms = load_structure(args.structure, args.frame)
    except Exception as err:  # readers fail in many ways (ASE's formats, npz); all bad input
        raise UsageError(f"--structure {args.structure or 'azobenzene'} --frame {args.frame}: {err}") from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stop_cleanly_on_sigterm()
    try:
        calc = GAQCalculator(model=args.model, device=args.device, dtype=args.dtype, mode=args.mode, kernel=args.kernel)
    except (ModelFileError, ValueError) as err:
        raise UsageError(f"--model {args.model}: {err}") from err
    atoms.calc = calc
    model_path = Path(calc.model_path)
    model_name = model_path.parent.name if model_path.name == "model.pt" else model_path.stem
    suffix = f"_{args.mode}" if calc.quantized else ""
    out = Path(args.out) if args.out else Path("runs") / "md" / f"{protocol}_{model_name}{suffix}"
    metadata = {
        "model": str(args.model),
        "model_path": str(model_path),
        "structure": str(args.structure or "azobenzene"),
        "frame": args.frame,
        "device": args.device,
        "dtype": args.dtype,
        "mode": args.mode if calc.quantized else None,
        "kernel": calc.kernel,
        "torch_threads": torch.get_num_threads(),
        "command": shlex.join(sys.argv),
    }
    return atoms, out, metadata


def report(summary: dict, out: Path) -> int:
    """Print the headline numbers; the exit status: 0 completed, 3 blow-up."""
    keys = (
        "status",
        "n_steps",
        "simulated_ps",
        "energy_drift_meV_per_atom_per_ps",
        "total_energy_std_meV_per_atom",
        "mean_temperature_K",
        "ns_per_day",
        "overhead_fraction",
    )
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    print(f"wrote {out}/summary.json, trajectory.h5, energies.png")
    return 0 if summary.get("status") == "completed" else EXIT_BLOW_UP


def run_main(fn) -> int:
    """Run fn() -> exit status. Ctrl-C: 130 (frames and summary already saved). Bad arguments or input,
    refused starts and restarts: one line and 2 (nothing was written). A failed write (disk full): one
    line and 1 (frames up to the checkpoint are kept)."""
    try:
        return fn()
    except KeyboardInterrupt:
        print("interrupted; continue with --restart", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, InputError, FileExistsError, RestartError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"error: {err}; once there is room, continue with --restart", file=sys.stderr)
        return EXIT_WRITE_ERROR
