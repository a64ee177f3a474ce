"""Trajectory analysis: energy drift, fluctuations, momentum conservation, the energy plots.

All functions read the arrays as stored in the HDF5 trajectory (see trajectory.py for units).
"""

from __future__ import annotations

import math
import os
import textwrap

import numpy as np

from gaq_calc.io import atomic_path
from gaq_calc.units import MEV_PER_EV


def energy_drift(times_ps, total_energy_eV, n_atoms: int) -> float:
    """Drift of the total energy in meV/atom/ps: the slope of a linear least-squares fit of E/N vs t.

    A fit over the whole series, rather than E(end) - E(0), is insensitive to the (larger) per-frame
    fluctuation of a Verlet integrator's energy around its shadow Hamiltonian. NaN for < 2 frames.
    """
    t = np.asarray(times_ps, dtype=np.float64)
    e = np.asarray(total_energy_eV, dtype=np.float64) / n_atoms
    if len(t) < 2 or np.ptp(t) == 0:
        return math.nan
    slope = np.polyfit(t - t.mean(), e, 1)[0]  # eV/atom/ps; centred for conditioning
    return float(slope * MEV_PER_EV)


def energy_drift_stderr(times_ps, total_energy_eV, n_atoms: int, blocks: int = 20) -> float:
    """Standard error of energy_drift in meV/atom/ps, from a linear fit to the means of `blocks`
    consecutive blocks of frames: block means absorb the frame-to-frame correlation of the energy
    fluctuations, which makes the per-frame least-squares error far too small. NaN for < 3 blocks of
    3 frames. A drift within ~2 standard errors of zero is not distinguishable from no drift."""
    t = np.asarray(times_ps, dtype=np.float64)
    e = np.asarray(total_energy_eV, dtype=np.float64) / n_atoms
    blocks = min(blocks, len(t) // 3)
    if blocks < 3:
        return math.nan
    parts = np.array_split(np.arange(len(t)), blocks)
    tb = np.array([t[i].mean() for i in parts])
    eb = np.array([e[i].mean() for i in parts])
    tc = tb - tb.mean()
    if not np.any(tc):
        return math.nan
    slope = (tc * (eb - eb.mean())).sum() / (tc**2).sum()
    resid = eb - eb.mean() - slope * tc
    return float(np.sqrt((resid**2).sum() / (blocks - 2) / (tc**2).sum()) * MEV_PER_EV)


def momenta_and_angular_momenta(positions, velocities, masses) -> tuple[np.ndarray, np.ndarray]:
    """Total linear momentum P [n_frames, 3] (amu·Å/fs) and angular momentum about the centre of mass
    L [n_frames, 3] (amu·Å²/fs) per frame, from positions [n, N, 3] Å and velocities [n, N, 3] Å/fs."""
    m = np.asarray(masses, dtype=np.float64)[None, :, None]  # [1, N, 1]
    mv = m * velocities  # [n, N, 3]
    p = mv.sum(axis=1)
    com = (m * positions).sum(axis=1, keepdims=True) / m.sum()
    ang = np.cross(positions - com, mv).sum(axis=1)
    return p, ang


def _finite(x):
    """JSON-friendly float: None for NaN/inf (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def summarize_trajectory(data: dict[str, np.ndarray], masses) -> dict:
    """Physics summary of a trajectory's datasets (see trajectory.FRAME_FIELDS)."""
    n_frames = len(data["step"])
    n_atoms = len(masses)
    out = {"n_frames": n_frames, "n_atoms": n_atoms}
    if n_frames == 0:
        return out
    t, etot = data["time_ps"], data["total_energy"]
    p, ang = momenta_and_angular_momenta(data["positions"], data["velocities"], masses)
    out.update(
        {
            "first_step": int(data["step"][0]),
            "last_step": int(data["step"][-1]),
            "simulated_ps": _finite(t[-1] - t[0]),
            "energy_drift_meV_per_atom_per_ps": _finite(energy_drift(t, etot, n_atoms)),
            "energy_drift_stderr_meV_per_atom_per_ps": _finite(energy_drift_stderr(t, etot, n_atoms)),
            "total_energy_std_meV_per_atom": _finite(np.std(etot / n_atoms) * MEV_PER_EV),
            "total_energy_max_deviation_meV_per_atom": _finite(np.max(np.abs(etot - etot[0])) / n_atoms * MEV_PER_EV),
            "mean_temperature_K": _finite(np.mean(data["temperature"])),
            "std_temperature_K": _finite(np.std(data["temperature"])),
            "linear_momentum_initial_amu_A_per_fs": _finite(np.linalg.norm(p[0])),
            "linear_momentum_drift_amu_A_per_fs": _finite(np.max(np.linalg.norm(p - p[0], axis=1))),
            "angular_momentum_initial_amu_A2_per_fs": _finite(np.linalg.norm(ang[0])),
            "angular_momentum_drift_amu_A2_per_fs": _finite(np.max(np.linalg.norm(ang - ang[0], axis=1))),
        }
    )
    return out


def plot_energies(data: dict[str, np.ndarray], n_atoms: int, path: str | os.PathLike, title: str = "") -> None:
    """Potential, kinetic and total energy per atom (meV/atom, relative to the first frame) vs time."""
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    t = data["time_ps"]
    if len(t):
        for name, label in (
            ("potential_energy", "potential"),
            ("kinetic_energy", "kinetic"),
            ("total_energy", "total"),
        ):
            e = (data[name] - data[name][0]) / n_atoms * MEV_PER_EV
            ax.plot(t, e, label=label, lw=1.0 if name != "total_energy" else 1.5)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("E - E(0) (meV/atom)")
    ax.set_title(_wrap(title), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    _save_png(fig, path)


def plot_energy_comparison(
    runs, path: str | os.PathLike, title: str = "", max_points: int = 4000, temperature_window_ps: float = 1.0
) -> None:
    """Several runs on one figure: total energy per atom relative to each run's first frame
    (meV/atom), and temperature averaged over windows of `temperature_window_ps`, against time.
    Long runs are thinned to about `max_points` frames (the last frame is always kept).

    runs: (label, data, n_atoms) triples; data holds `time_ps`, `total_energy` (eV), `temperature` (K).
    """
    fig = _figure((7.5, 6.5))
    ax_e, ax_t = fig.subplots(2, 1, sharex=True)
    for label, data, n_atoms in runs:
        t = data["time_ps"]
        if not len(t):
            continue
        stride = max(1, math.ceil(len(t) / max_points))
        keep = np.unique(np.r_[np.arange(0, len(t), stride), len(t) - 1])
        e = (data["total_energy"][keep] - data["total_energy"][0]) / n_atoms * MEV_PER_EV
        (line,) = ax_e.plot(t[keep], e, lw=1.0, label=label)
        frame_ps = (t[-1] - t[0]) / max(len(t) - 1, 1)
        per_window = max(1, round(temperature_window_ps / frame_ps)) if frame_ps > 0 else 1
        per_window = min(per_window, len(t))
        n = len(t) // per_window * per_window  # whole windows only: a short last one would be noise
        ax_t.plot(
            t[:n].reshape(-1, per_window).mean(1),
            data["temperature"][:n].reshape(-1, per_window).mean(1),
            lw=1.0,
            color=line.get_color(),
        )
    ax_e.set_ylabel("E_total - E_total(0) (meV/atom)")
    ax_e.set_title(_wrap(title), fontsize=9)
    ax_e.legend(fontsize=8, loc="upper left")
    ax_t.set_ylabel(f"temperature (K), {temperature_window_ps:g} ps means")
    ax_t.set_xlabel("time (ps)")
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
    _save_png(fig, path)


def _wrap(title: str) -> str:
    return "\n".join(textwrap.wrap(title, 85))  # a blow-up status is longer than the figure is wide


def _figure(size):
    """matplotlib's object API with the Agg canvas: no pyplot global state, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:  # a reader never sees a half-written image
        fig.savefig(tmp, dpi=120, format="png")
