"""The MD loop: integrate, log every K steps to HDF5, check for blow-ups, checkpoint, summarise.

One call of `run_phase` runs one integrator (one ensemble) from step 0 or from its checkpoint to
`settings.n_steps`. The loop drives `dyn.step()` itself (not `dyn.run`) so that logging, checks and
flushes happen only at logged steps and their cost can be measured separately from the calculator's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units

from gaq_calc.md.analysis import plot_energies, summarize_trajectory
from gaq_calc.md.dynamics import make_dynamics, set_thermostat_state, thermostat_state
from gaq_calc.md.stability import BlowUp, StabilityMonitor
from gaq_calc.md.trajectory import (
    RestartError,
    TrajectoryWriter,
    load_checkpoint,
    read_frame,
    read_json,
    read_trajectory,
    save_checkpoint,
    saved_frames,
    write_json_atomic,
)

#: Settings that must not change between a run and its restart (n_steps may grow: extend a run).
RESTART_SAME_MODEL = ("model_path", "mode", "dtype")  # metadata that a restart must not change
RESTART_INVARIANT = (
    "ensemble",
    "thermostat",
    "temperature_K",
    "timestep_fs",
    "log_every",
    "seed",
    "friction_per_fs",
    "taut_fs",
    "tchain",
)
#: The system a restart must continue (trajectory attributes): same atom count with other elements,
#: masses, cell or pbc would run on silently, since positions and momenta come from the saved state.
RESTART_SAME_SYSTEM = {"numbers": "atomic numbers", "masses": "masses", "cell": "cell", "pbc": "pbc"}


class InputError(ValueError):
    """A run that cannot start from its input (e.g. an element the model does not know). Nothing was
    written."""


@dataclass
class MDSettings:
    """One MD phase. Times in fs (friction in 1/fs), temperatures in K, lengths in Å."""

    ensemble: str = "nve"  # "nve" | "nvt"
    thermostat: str | None = None  # NVT: "langevin" | "bussi" | "nose-hoover"
    temperature_K: float = 300.0  # NVT target; NVE: temperature of the initial velocities
    timestep_fs: float = 0.5
    n_steps: int = 2_000_000  # 1 ns at 0.5 fs
    log_every: int = 20  # steps between logged frames (and blow-up checks)
    seed: int = 0
    friction_per_fs: float = 0.01  # Langevin
    taut_fs: float = 100.0  # Bussi time constant / Nose-Hoover damping time
    tchain: int = 3  # Nose-Hoover chain length
    max_temperature_K: float | None = None  # None: max(5 x temperature_K, 2000 K)
    bond_tolerance_A: float = 0.5
    flush_every: int = 50  # logged frames between HDF5 flushes (+ checkpoint)
    flush_seconds: float = 30.0  # ... or at most this long between flushes

    def __post_init__(self):
        if self.ensemble not in ("nve", "nvt"):
            raise ValueError(f"ensemble must be 'nve' or 'nvt', not {self.ensemble!r}")
        if self.ensemble == "nve":
            self.thermostat = None
        # finite numbers (NaN fails every comparison), > 0 or >= 0
        positive = {
            "timestep_fs": self.timestep_fs,
            "taut_fs": self.taut_fs,
            "bond_tolerance_A": self.bond_tolerance_A,
            "max_temperature_K": self.max_temperature_K,
        }
        non_negative = {
            "temperature_K": self.temperature_K,
            "friction_per_fs": self.friction_per_fs,
            "flush_seconds": self.flush_seconds,
            "n_steps": self.n_steps,
            "seed": self.seed,
        }
        bad = [
            f"{k} = {v} (need finite > 0)" for k, v in positive.items() if v is not None and not 0 < v < math.inf
        ] + [f"{k} = {v} (need finite >= 0)" for k, v in non_negative.items() if not 0 <= v < math.inf]
        if bad:
            raise ValueError("MDSettings: " + ", ".join(bad))
        if self.log_every < 1 or self.flush_every < 1 or self.tchain < 1:
            raise ValueError("log_every, flush_every and tchain must be >= 1")

    @property
    def temperature_limit_K(self) -> float:
        if self.max_temperature_K is not None:
            return float(self.max_temperature_K)
        return max(5.0 * self.temperature_K, 2000.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CalculatorTimer:
    """Accumulates wall time spent in `calc.calculate`, to measure the protocol's overhead honestly.

    Installed as an instance attribute that shadows the class method (ASE's Calculator calls
    self.calculate), and removed again by `uninstall`; the calculator class is not touched.
    """

    def __init__(self, calc):
        self.calc = calc
        self.seconds = 0.0
        self.calls = 0
        self._shadowed = calc.__dict__.get("calculate")  # an instance-level wrapper already there, if any
        inner = calc.calculate

        def timed_calculate(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        calc.calculate = timed_calculate

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def uninstall(self) -> None:
        if self._shadowed is None:
            self.calc.__dict__.pop("calculate", None)
        else:
            self.calc.calculate = self._shadowed


@contextmanager
def _timed_calculator(calc):
    timer = CalculatorTimer(calc)
    try:
        yield timer
    finally:
        timer.uninstall()


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=not enabled,
        mininterval=1.0,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def phase_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Files of one phase: 'trajectory' -> trajectory.h5, checkpoint.json, summary.json, energies.png;
    'equilibration' -> equilibration.h5, equilibration_checkpoint.json, equilibration_summary.json,
    equilibration_energies.png."""
    out = Path(out_dir)
    prefix = "" if name == "trajectory" else f"{name}_"
    return {
        "h5": out / f"{name}.h5",
        "checkpoint": out / f"{prefix}checkpoint.json",
        "summary": out / f"{prefix}summary.json",
        "plot": out / f"{prefix}energies.png",
    }


def check_fresh_start(out_dir: str | os.PathLike, name: str = "trajectory") -> None:
    """Refuse to start a phase afresh over saved frames or a saved checkpoint (FileExistsError)."""
    paths = phase_paths(out_dir, name)
    existing = [p.name for p in (paths["h5"], paths["checkpoint"]) if p.exists()]
    if existing:
        raise FileExistsError(
            f"{out_dir} already holds {' and '.join(existing)}; pass restart=True "
            "(--restart) to continue that run, or choose another output folder"
        )


def has_saved_state(out_dir: str | os.PathLike, name: str = "trajectory") -> bool:
    """Whether a phase has something to continue: its checkpoint, or a trajectory with a frame (an
    unreadable trajectory counts, so that the restart reports it)."""
    paths = phase_paths(out_dir, name)
    if paths["checkpoint"].exists():
        return True
    if not paths["h5"].exists():
        return False
    try:
        return len(saved_frames(paths["h5"])[0]) > 0
    except (OSError, KeyError):
        return True


def check_restart(out_dir: str | os.PathLike, name: str, atoms: Atoms, settings: MDSettings, metadata: dict) -> None:
    """The checks a restart of phase `name` in out_dir makes before it writes anything (same settings, model
    setup and system; readable files), run on their own: a program that will start several runs one after
    another can refuse a later one before the first is started. Reads only; raises RestartError."""
    _saved_state(phase_paths(out_dir, name), atoms, settings, metadata)


def refresh_summary(run_dir: str | os.PathLike, phase: str = "trajectory") -> dict:
    """Recompute the physics fields of a finished or stopped run's summary, and its energy plot, from
    its HDF5 trajectory with the current analysis code (new estimators for old runs). Status, timing
    and settings stay; written atomically."""
    paths = phase_paths(run_dir, phase)
    if not paths["summary"].exists() or not paths["h5"].exists():
        raise FileNotFoundError(f"{run_dir} needs {paths['summary'].name} and {paths['h5'].name}")
    summary = read_json(paths["summary"])
    data, attrs = read_trajectory(paths["h5"])
    summary.update(summarize_trajectory(data, attrs["masses"]))
    write_json_atomic(paths["summary"], summary)
    plot_energies(data, len(attrs["numbers"]), paths["plot"], title=_plot_title(summary))
    return summary


def run_phase(
    atoms: Atoms,
    settings: MDSettings,
    out_dir: str | os.PathLike,
    *,
    name: str = "trajectory",
    restart: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
    summary_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    summary_extra: dict | None = None,
    reference: Atoms | None = None,
) -> dict:
    """Run (or resume) one MD phase on `atoms` (calculator attached, momenta set) and return its summary.

    atoms: modified in place; on return it holds the last state reached (the last good one on a blow-up).
    restart: resume from `<name>` checkpoint in out_dir, or from the last frame of its trajectory when the
        checkpoint is lost (not bit-exact; warns); start fresh when there is neither. Refused (RestartError,
        before anything is written) when settings, model or system differ from the saved run's. Without
        restart, an existing trajectory or checkpoint is an error rather than silently overwritten.
    metadata: stored as HDF5 attributes and copied into the summary (model name, structure, ...).
    reference: structure whose bonds the blow-up check watches (default: atoms as given); kept in the
        file so that a restart watches the same bonds.
    Raises whatever interrupted the run (KeyboardInterrupt, SystemExit from a SIGTERM handler) after
    flushing frames, checkpoint and an "interrupted" summary; a blow-up is not raised, it is reported
    in summary["status"].
    """
    paths = phase_paths(out_dir, name)
    metadata = dict(metadata or {})
    calc = atoms.calc
    if calc is None:
        raise ValueError("atoms need a calculator")
    masses = atoms.get_masses()  # [N] amu
    n_atoms = len(atoms)

    # Every check runs before the first write: a refused run or restart changes no file.
    resume = _saved_state(paths, atoms, settings, metadata) if restart else None
    if resume is None:
        if not restart:
            check_fresh_start(out_dir, name)
        try:
            atoms.get_potential_energy()  # cached: frame 0 and the integrator's first forces reuse it
        except (ValueError, FloatingPointError) as err:  # unknown element, overlapping atoms, NaN output
            raise InputError(f"the model cannot evaluate the starting structure: {err}") from err
        if paths["h5"].exists():  # restart of a run killed before its first frame: no frame to lose
            paths["h5"].unlink()

    phase = 1 if name == "trajectory" else 2
    rng = np.random.default_rng([settings.seed, phase])
    if resume is not None:
        atoms.set_positions(resume["positions"], apply_constraint=False)
        atoms.set_momenta(resume["momenta"], apply_constraint=False)
        start = int(resume["step"])
        if resume["rng"] is not None:
            rng.bit_generator.state = resume["rng"]
        else:  # rebuilt from a frame: a fresh stream, the same for every rebuild from this step
            rng = np.random.default_rng([settings.seed, phase, start])
        reference = resume["reference"]
    else:
        start = 0
        reference = (reference if reference is not None else atoms).copy()

    dyn = make_dynamics(
        atoms,
        settings.ensemble,
        settings.timestep_fs,
        temperature_K=settings.temperature_K,
        thermostat=settings.thermostat,
        friction_per_fs=settings.friction_per_fs,
        taut_fs=settings.taut_fs,
        tchain=settings.tchain,
        rng=rng,
    )
    if resume is not None:
        set_thermostat_state(dyn, resume["thermostat"])
    dyn.nsteps = start
    monitor = StabilityMonitor(reference, settings.temperature_limit_K, settings.bond_tolerance_A)
    dt_fs = settings.timestep_fs

    attrs = {
        "numbers": atoms.numbers,
        "masses": masses,
        "timestep_fs": dt_fs,
        "seed": settings.seed,
        "settings": json.dumps(settings.to_dict()),
        "reference_positions": reference.positions,
        "cell": np.asarray(atoms.cell.array),
        "pbc": np.asarray(atoms.pbc),
        **{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in metadata.items() if v is not None},
    }
    writer = TrajectoryWriter(paths["h5"], n_atoms, attrs, resume_step=start if resume is not None else None)

    def snapshot(step: int) -> dict:
        """The state at a logged step: appended to the trajectory; also the next checkpoint."""
        positions = atoms.get_positions()  # [N, 3] Å, copy
        momenta = atoms.get_momenta()  # [N, 3] amu·Å/(ASE time), copy
        epot = float(atoms.get_potential_energy())  # cached by the calculator
        ekin = float(atoms.get_kinetic_energy())
        temperature = float(atoms.get_temperature())
        velocities = momenta / masses[:, None] * units.fs  # Å/fs
        writer.append(
            step=step,
            time_ps=step * dt_fs / 1000.0,
            positions=positions,
            velocities=velocities,
            potential_energy=epot,
            kinetic_energy=ekin,
            total_energy=epot + ekin,
            temperature=temperature,
        )
        monitor.check(step, positions, velocities, (epot, ekin), temperature)
        return {
            "step": step,
            "temperature": temperature,
            "positions": positions,
            "momenta": momenta,
            "rng": rng.bit_generator.state,
            "thermostat": thermostat_state(dyn),
            "settings": settings.to_dict(),
        }

    status = "completed"
    completed = start  # last step integrated without error
    good = None  # latest checkpointable state; written only after its frame has been flushed
    t_loop = None
    t_step = t_protocol = 0.0
    bar = _progress_bar(settings.n_steps, start, desc=f"{name} ({_ensemble_label(settings)})", enabled=progress)
    with _timed_calculator(calc) as timer:
        try:
            if resume is None:
                good = snapshot(0)
                writer.flush()
                save_checkpoint(paths["checkpoint"], good)
            timer.reset()
            t_loop = last_flush = time.perf_counter()
            for step in range(start + 1, settings.n_steps + 1):
                t0 = time.perf_counter()
                try:
                    dyn.step()
                except (ValueError, FloatingPointError) as err:  # NaN positions, overlapping atoms, NaN forces
                    raise BlowUp(f"calculator failed at step {step}: {err}") from err
                completed = step
                t1 = time.perf_counter()
                t_step += t1 - t0
                if step % settings.log_every == 0 or step == settings.n_steps:
                    state = snapshot(step)  # raises BlowUp after appending the frame
                    good = state
                    if writer.pending >= settings.flush_every or t1 - last_flush >= settings.flush_seconds:
                        writer.flush()
                        save_checkpoint(paths["checkpoint"], good)
                        last_flush = time.perf_counter()
                    ns_day = (step - start) * dt_fs * 1e-6 / max(t1 - t_loop, 1e-9) * 86400.0
                    bar.update(step - bar.n)
                    bar.set_postfix_str(f"{ns_day:.3g} ns/day, T={state['temperature']:.0f} K", refresh=False)
                t_protocol += time.perf_counter() - t1
        except BlowUp as err:
            status = f"blow-up: {err}"
            print(f"MD stopped, {status}", file=sys.stderr, flush=True)
        except BaseException as err:
            status = f"interrupted: {type(err).__name__}"
            raise
        finally:
            wall = time.perf_counter() - t_loop if t_loop is not None else 0.0
            bar.close()
            if good is not None:
                # leave atoms at the last good logged state (a blow-up or an interrupt may leave a
                # half-updated or unphysical one)
                atoms.set_positions(good["positions"], apply_constraint=False)
                atoms.set_momenta(good["momenta"], apply_constraint=False)
            # Flushes everything appended, including a blown-up frame (for diagnosis). Without room it
            # raises DiskFullError: then nothing more is written, and the checkpoint stays at the
            # last frame in the file.
            writer.close()
            if good is not None:
                save_checkpoint(paths["checkpoint"], good)
            timing = {
                "wall_s": wall,
                "calculator_s": timer.seconds,
                "calculator_calls": timer.calls,
                "integrator_s": t_step - timer.seconds,
                "protocol_s": t_protocol,
            }
            data, _ = read_trajectory(paths["h5"])  # once, for both the summary and the plot
            summary = _summary(data, masses, settings, status, metadata, timing, completed, start, summary_extra)
            if completed == start and summary_path is not None and summary_path.exists():
                summary = _keep_last_speed(summary, read_json(summary_path))
            if summary_path is not None:
                write_json_atomic(summary_path, summary)
            if plot_path is not None:
                plot_energies(data, n_atoms, plot_path, title=_plot_title(summary))
    return summary


def _ensemble_label(settings: MDSettings) -> str:
    return "NVE" if settings.ensemble == "nve" else f"NVT/{settings.thermostat}"


def _plot_title(summary: dict) -> str:
    s = summary["settings"]
    return (
        f"{summary.get('model', '')} {summary['protocol']} {s['temperature_K']:g} K, "
        f"dt {s['timestep_fs']:g} fs; {summary['status']}"
    )


def _saved_state(paths: dict[str, Path], atoms: Atoms, settings: MDSettings, metadata: dict) -> dict | None:
    """The state a restart continues from, after every check; reads only, so a refused restart changes
    no file. None when there is nothing to continue: no files, or a trajectory without a frame.

    From the checkpoint when there is one (exact). Without it, from the last frame of the trajectory
    (positions, velocities and step are saved per frame), with a warning that the continuation is not
    bit-exact. Saved frames are never dropped, except the few a kill leaves after the checkpoint, which
    the restart recomputes."""
    h5, ckpt_path = paths["h5"], paths["checkpoint"]
    if not h5.exists():
        if ckpt_path.exists():
            raise RestartError(f"{ckpt_path} has no trajectory {h5} to continue")
        return None
    try:
        steps, attrs = saved_frames(h5)
    except (OSError, KeyError) as err:
        raise RestartError(f"cannot read {h5} ({err}); move it away to start the run afresh") from err
    ckpt = None
    if ckpt_path.exists():
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (OSError, ValueError) as err:
            raise RestartError(
                f"{err}; move it away and restart again to continue from the last frame of {h5.name} (not bit-exact)"
            ) from err
    elif len(steps) == 0:
        return None  # killed before its first frame was flushed: nothing to continue, nothing to lose
    _check_restart_settings(ckpt["settings"] if ckpt else json.loads(attrs["settings"]), settings)
    changed = [
        f"{k}: {attrs.get(k)!r} -> {metadata.get(k)!r}"
        for k in RESTART_SAME_MODEL
        if k in attrs and k in metadata and str(attrs.get(k)) != str(metadata.get(k))
    ]
    if changed:
        raise RestartError("cannot restart with a different model setup (" + "; ".join(changed) + ")")
    _check_same_system(attrs, atoms, h5)
    reference = atoms.copy()
    reference.set_positions(np.asarray(attrs["reference_positions"], dtype=np.float64))
    if ckpt is not None:
        _check_checkpoint_fits(ckpt, steps, h5, ckpt_path, settings)
        return {**ckpt, "thermostat": ckpt.get("thermostat", {}), "reference": reference}
    return {**_state_from_frame(h5, len(steps) - 1, atoms, settings, reference, ckpt_path.name), "reference": reference}


def _check_same_system(saved: dict, atoms: Atoms, h5: Path) -> None:
    if len(saved["numbers"]) != len(atoms):
        raise RestartError(
            f"cannot restart with a different system: {h5} holds {len(saved['numbers'])} atoms, "
            f"the structure given has {len(atoms)}"
        )
    given = {"numbers": atoms.numbers, "masses": atoms.get_masses(), "cell": atoms.cell.array, "pbc": atoms.pbc}
    changed = [
        f"{label} (stored {np.asarray(saved[key]).tolist()}, given {given[key].tolist()})"
        for key, label in RESTART_SAME_SYSTEM.items()
        if key in saved and not np.array_equal(np.asarray(saved[key]), given[key])
    ]
    if changed:
        raise RestartError(f"cannot restart with a different system: {h5} holds other " + "; ".join(changed))


def _check_checkpoint_fits(ckpt: dict, steps: np.ndarray, h5: Path, ckpt_path: Path, settings: MDSettings):
    """The checkpoint must be the state of a frame in the file, and at most one flush batch (what a kill
    can leave) may follow it: those frames are dropped and recomputed. A checkpoint from another run or
    an older one (restored from a backup, say) would otherwise cut saved frames."""
    step = int(ckpt["step"])
    k = int(np.searchsorted(steps, step))
    if k == len(steps) or steps[k] != step:
        last = f"its last complete frame is at step {steps[-1]}" if len(steps) else "it has no complete frame"
        raise RestartError(f"{h5} has no frame at the checkpoint's step {step} ({last}); cannot restart consistently")
    if not np.array_equal(read_frame(h5, k)["positions"], ckpt["positions"]):
        raise RestartError(
            f"{ckpt_path} does not match the frame at its step {step} in {h5}: it belongs to another run"
        )
    after = len(steps) - 1 - k
    limit = max(int(ckpt["settings"].get("flush_every", 1)), settings.flush_every)
    if after > limit:
        raise RestartError(
            f"{h5} has {after} frames after the checkpoint's step {step}, more than a kill "
            f"leaves ({limit}): {ckpt_path.name} is older than the trajectory; move it away "
            "to continue from the last frame (not bit-exact)"
        )


def _state_from_frame(h5: Path, index: int, atoms: Atoms, settings: MDSettings, reference: Atoms, missing: str) -> dict:
    """A restart state rebuilt from a saved frame, when the checkpoint is lost."""
    frame = read_frame(h5, index)
    step = int(frame["step"])
    monitor = StabilityMonitor(reference, settings.temperature_limit_K, settings.bond_tolerance_A)
    try:
        monitor.check(
            step,
            frame["positions"],
            frame["velocities"],
            (frame["potential_energy"], frame["kinetic_energy"]),
            frame["temperature"],
        )
    except BlowUp as err:  # the blown-up frame kept for diagnosis; an earlier one would mean dropping it
        raise RestartError(
            f"{missing} is missing and the last frame of {h5} is no state to continue from "
            f"({err}); start a new run in another folder"
        ) from err
    lost = {
        "langevin": " and the thermostat's random-number state cannot be recovered",
        "bussi": " and the thermostat's random-number state cannot be recovered",
        "nose-hoover": " and the Nose-Hoover chain variables cannot be recovered (the chain restarts at rest)",
    }.get(settings.thermostat, "")
    warnings.warn(
        f"{missing} is missing: continuing from the last frame of {h5.name} (step {step}); the "
        f"momenta are rebuilt from the stored velocities (rounded in the last bit){lost}, so the "
        "continuation is not bit-exact",
        RuntimeWarning,
        stacklevel=4,
    )
    return {
        "step": step,
        "positions": frame["positions"],
        "momenta": frame["velocities"] * atoms.get_masses()[:, None] / units.fs,  # Å/fs -> ASE units
        "rng": None,
        "thermostat": {},
    }


def _check_restart_settings(saved: dict, settings: MDSettings) -> None:
    new = settings.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in RESTART_INVARIANT if saved.get(k) != new[k]]
    if changed:
        raise RestartError("cannot restart with different settings (" + "; ".join(changed) + ")")


SPEED_FIELDS = ("steps_this_session", "steps_per_second", "ns_per_day", "overhead_fraction",
                "integrator_overhead_fraction", "timing")  # fmt: skip


def _keep_last_speed(summary: dict, previous: dict) -> dict:
    """A restart that integrates no step (the run was already complete) keeps the speed of the last session
    that did, instead of replacing it with nothing measured."""
    if not previous.get("steps_per_second"):
        return summary
    return {**summary, **{k: previous[k] for k in SPEED_FIELDS if k in previous}}


def _summary(
    data: dict[str, np.ndarray],
    masses,
    settings: MDSettings,
    status: str,
    metadata: dict,
    timing: dict,
    completed: int,
    start: int,
    extra: dict | None,
) -> dict:
    physics = summarize_trajectory(data, masses)
    calc_s = timing["calculator_s"]
    wall = timing["wall_s"]
    steps_done = completed - start
    steps_per_s = steps_done / wall if wall > 0 and steps_done else None
    out = {
        "status": status,
        "protocol": _ensemble_label(settings),
        **{k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "n_steps": completed,  # steps integrated, over all sessions of a restarted run
        "target_steps": settings.n_steps,
        **physics,
        "steps_this_session": steps_done,
        "steps_per_second": steps_per_s,
        "ns_per_day": steps_per_s * settings.timestep_fs * 1e-6 * 86400.0 if steps_per_s else None,
        # the protocol's own cost (logging, checks, HDF5, checkpoints, progress bar) per calculator second
        "overhead_fraction": timing["protocol_s"] / calc_s if calc_s > 0 else None,
        # ASE's integrator arithmetic and atoms bookkeeping, per calculator second (not ours to cut)
        "integrator_overhead_fraction": timing["integrator_s"] / calc_s if calc_s > 0 else None,
        "timing": timing,
        "settings": settings.to_dict(),
        "units": {
            "energy": "eV (summary: meV/atom)",
            "time": "ps",
            "temperature": "K",
            "linear_momentum": "amu·Å/fs",
            "angular_momentum": "amu·Å²/fs (about the centre of mass)",
            "drift": "meV/atom/ps, least-squares slope of total energy per atom vs time",
        },
    }
    if extra:
        out.update(extra)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
