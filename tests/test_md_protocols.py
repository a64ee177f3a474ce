"""MD protocols (gaq_calc.md, md_protocols/nve.py, nvt.py): energy conservation, exact restarts,
the drift estimator, blow-up detection, and the command-line programs end to end.

Runs are short (tens of steps): the tiny untrained model exercises the machinery, the shipped ethanol
model (trained, smooth) the physics.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import ethanol, nve

from gaq_calc import GAQCalculator
from gaq_calc.md import (
    BlowUp,
    MDSettings,
    RestartError,
    StabilityMonitor,
    energy_drift,
    energy_drift_stderr,
    load_structure,
    read_trajectory,
    run_nve,
    run_nvt,
)
from gaq_calc.md.trajectory import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ethanol_calc():
    """The shipped ethanol model in float64, so the integrator's error is not hidden by rounding."""
    return GAQCalculator("ethanol_fp32", dtype="float64")


# ---- drift estimator --------------------------------------------------------------------------


def test_energy_drift_recovers_a_known_slope_under_noise():
    rng = np.random.default_rng(0)
    n_atoms, slope = 24, 0.37  # meV/atom/ps
    t = np.linspace(0.0, 50.0, 2001)  # ps
    e = -1000.0 + n_atoms * slope * 1e-3 * t + rng.normal(0.0, n_atoms * 0.2e-3, t.size)  # eV, 0.2 meV/atom noise
    # standard error of the slope: sigma / (std(t) sqrt(n)) = 0.2 / (14.4 * 44.7) ~ 3e-4 meV/atom/ps
    assert energy_drift(t, e, n_atoms) == pytest.approx(slope, abs=2e-3)
    assert energy_drift(t, np.full_like(t, -5.0), n_atoms) == pytest.approx(0.0, abs=1e-12)
    assert energy_drift(t, -e, n_atoms) == pytest.approx(-slope, abs=2e-3)
    assert np.isnan(energy_drift([1.0], [2.0], 3))


def test_drift_standard_error_from_block_means():
    rng = np.random.default_rng(1)
    n_atoms, slope, sigma = 24, 0.37, 0.2  # meV/atom/ps, meV/atom
    t = np.linspace(0.0, 50.0, 20001)
    white = rng.normal(0.0, sigma, t.size)
    se = energy_drift_stderr(t, n_atoms * 1e-3 * (slope * t + white), n_atoms)
    analytic = sigma / (t.std() * np.sqrt(t.size))  # least squares with uncorrelated noise
    assert 0.5 * analytic < se < 2.0 * analytic
    # correlated noise (AR(1), correlation time ~500 frames): per-frame least squares would claim a far
    # too small error; block means see the real scatter, and the true slope lies within it
    ar = np.zeros(t.size)
    for i in range(1, t.size):
        ar[i] = 0.998 * ar[i - 1] + rng.normal(0.0, sigma * np.sqrt(1 - 0.998**2))
    e = n_atoms * 1e-3 * (slope * t + ar)
    se_ar = energy_drift_stderr(t, e, n_atoms)
    assert se_ar > 5 * analytic
    assert abs(energy_drift(t, e, n_atoms) - slope) < 4 * se_ar
    assert energy_drift_stderr(t, np.full_like(t, -5.0), n_atoms) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(energy_drift_stderr(t[:8], t[:8], n_atoms))


# ---- energy conservation ----------------------------------------------------------------------


def test_nve_conserves_energy_with_the_shipped_ethanol_model(tmp_path, ethanol_calc):
    """100 steps (50 fs) at 0.5 fs from 300 K. Measured (float64 and float32 alike): std of E_total
    0.10 meV/atom, max |E - E(0)| 0.33 meV/atom over 200 steps, i.e. the velocity-Verlet O(dt^2)
    fluctuation; kinetic energy swings by ~10 meV/atom meanwhile. Bounds: 3x the measurement."""
    s = run_nve(ethanol(ethanol_calc), nve(100), tmp_path, progress=False, metadata={"model": "ethanol_fp32"})
    assert s["status"] == "completed" and s["n_steps"] == 100 and s["n_frames"] == 21
    assert s["total_energy_std_meV_per_atom"] < 0.3
    assert s["total_energy_max_deviation_meV_per_atom"] < 1.0
    data, _ = read_trajectory(tmp_path / "trajectory.h5")
    assert np.ptp(data["kinetic_energy"]) / 9 * 1e3 > 10 * s["total_energy_std_meV_per_atom"]  # not trivially flat
    # velocity Verlet conserves total linear and angular momentum exactly (to rounding) when forces sum to zero
    assert s["linear_momentum_drift_amu_A_per_fs"] < 1e-9
    assert s["angular_momentum_drift_amu_A2_per_fs"] < 1e-8
    assert 0.0 <= s["overhead_fraction"] < 0.1  # logging every 5 steps
    assert s["timing"]["calculator_calls"] == 100
    assert (tmp_path / "summary.json").exists() and (tmp_path / "energies.png").stat().st_size > 1000


# ---- restart ----------------------------------------------------------------------------------


def _assert_same_trajectory(a_dir, b_dir, atol=1e-10):
    a, _ = read_trajectory(Path(a_dir) / "trajectory.h5")
    b, _ = read_trajectory(Path(b_dir) / "trajectory.h5")
    np.testing.assert_array_equal(a["step"], b["step"])
    for key in ("positions", "velocities", "total_energy", "temperature"):
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=atol, err_msg=key)
    return a


def test_nve_restart_reproduces_the_uninterrupted_run(tmp_path, ethanol_calc):
    """40 steps straight vs 20 + restart + 20 (after a short Langevin equilibration): the same frames,
    none lost or duplicated, positions equal to 1e-10 Å (float64, restart at a logged frame)."""
    eq = MDSettings("nvt", "langevin", temperature_K=300.0, timestep_fs=0.5, n_steps=10, log_every=5, seed=3)
    run_nve(ethanol(ethanol_calc), nve(40), tmp_path / "a", equilibration=eq, progress=False)
    first = run_nve(ethanol(ethanol_calc), nve(20), tmp_path / "b", equilibration=eq, progress=False)
    assert first["n_steps"] == 20
    second = run_nve(ethanol(ethanol_calc), nve(40), tmp_path / "b", equilibration=eq, restart=True, progress=False)
    a = _assert_same_trajectory(tmp_path / "a", tmp_path / "b")
    np.testing.assert_array_equal(a["step"], np.arange(0, 41, 5))
    assert second["status"] == "completed" and second["steps_this_session"] == 20
    assert second["equilibration"]["n_steps"] == 10


class InterruptAfter(GAQCalculator):
    """Raises KeyboardInterrupt (as Ctrl-C would) on call n_good + 1."""

    def __init__(self, *args, n_good, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_good, self.calls = n_good, 0

    def calculate(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.n_good:
            raise KeyboardInterrupt
        super().calculate(*args, **kwargs)


def test_interrupted_run_restarts_without_lost_or_duplicated_frames(tmp_path, tiny_model_file, tiny_calc):
    """Ctrl-C at step 17 with nothing flushed since step 0: the interrupt still saves frames 5-15 and
    the checkpoint. Then, as after a kill between flushing frames and writing the checkpoint, two
    stray frames lie beyond the checkpoint; the restart truncates them and recomputes."""
    run_nve(ethanol(tiny_calc), nve(30), tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_nve(
            ethanol(InterruptAfter(tiny_model_file, dtype="float64", n_good=18)),
            nve(30, flush_every=100),
            tmp_path / "b",
            progress=False,
        )
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "interrupted: KeyboardInterrupt" and summary["n_steps"] == 17
    assert load_checkpoint(tmp_path / "b" / "checkpoint.json")["step"] == 15
    with h5py.File(tmp_path / "b" / "trajectory.h5", "r+") as f:
        assert f["step"][:].tolist() == [0, 5, 10, 15]
        for name in f:  # two stray frames, steps 20 and 25
            f[name].resize(f[name].shape[0] + 2, axis=0)
            f[name][-2:] = 1.0
        f["step"][-2:] = [20, 25]
    run_nve(ethanol(tiny_calc), nve(30), tmp_path / "b", restart=True, progress=False)
    _assert_same_trajectory(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("thermostat", ["langevin", "bussi", "nose-hoover"])
def test_nvt_restart_is_exact_including_thermostat_state(tmp_path, ethanol_calc, thermostat):
    """The checkpoint carries the RNG state (Langevin, Bussi) and the chain variables (Nose-Hoover)."""

    def settings(n):
        return MDSettings(
            "nvt",
            thermostat,
            temperature_K=300.0,
            timestep_fs=0.5,
            n_steps=n,
            log_every=5,
            seed=7,
            taut_fs=5.0,
            friction_per_fs=0.05,
        )

    run_nvt(ethanol(ethanol_calc), settings(20), tmp_path / "a", progress=False)
    run_nvt(ethanol(ethanol_calc), settings(10), tmp_path / "b", progress=False)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.json")
    if thermostat == "nose-hoover":
        assert np.abs(ckpt["thermostat"]["p_eta"]).max() > 0  # the chain is moving
    else:
        assert ckpt["rng"] != np.random.default_rng([7, 1]).bit_generator.state  # noise was drawn
    s = run_nvt(ethanol(ethanol_calc), settings(20), tmp_path / "b", restart=True, progress=False)
    assert s["status"] == "completed"
    _assert_same_trajectory(tmp_path / "a", tmp_path / "b")


def test_restart_guards(tmp_path, tiny_calc):
    run_nve(ethanol(tiny_calc), nve(5), tmp_path, progress=False)
    with pytest.raises(FileExistsError):
        run_nve(ethanol(tiny_calc), nve(5), tmp_path, progress=False)
    with pytest.raises(RestartError, match="timestep_fs"):
        run_nve(
            ethanol(tiny_calc),
            MDSettings("nve", timestep_fs=0.25, n_steps=10, log_every=5, seed=3),
            tmp_path,
            restart=True,
            progress=False,
        )


# ---- blow-up detection ------------------------------------------------------------------------


def test_stretched_bond_is_a_blow_up():
    atoms = load_structure("ethanol")
    monitor = StabilityMonitor(atoms, max_temperature_K=2000.0)
    assert monitor.n_bonds == 8  # ethanol: C-C, C-O, O-H, 5 C-H
    pos, vel = atoms.get_positions(), np.zeros((9, 3))
    monitor.check(0, pos, vel, (0.0,), 300.0)  # the reference itself passes
    i, j = monitor.i[0], monitor.j[0]
    stretched = pos.copy()
    stretched[j] += (pos[j] - pos[i]) / np.linalg.norm(pos[j] - pos[i])  # +1 Å along the bond
    with pytest.raises(BlowUp, match=f"bond {i}-{j} deviates 1.00"):
        monitor.check(7, stretched, vel, (0.0,), 300.0)
    with pytest.raises(BlowUp, match="temperature"):
        monitor.check(7, pos, vel, (0.0,), 2500.0)
    with pytest.raises(BlowUp, match="non-finite energies"):
        monitor.check(7, pos, vel, (np.nan,), 300.0)


class NaNForcesAfter(GAQCalculator):
    """Forces turn NaN after `n_good` calls: the next positions are NaN and the calculator refuses them."""

    def __init__(self, *args, n_good, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_good, self.calls = n_good, 0

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.calls += 1
        if self.calls > self.n_good:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


def test_nan_forces_stop_the_run_and_keep_the_frames(tmp_path, tiny_model_file):
    atoms = ethanol(NaNForcesAfter(tiny_model_file, dtype="float64", n_good=12))
    # call k + 1 is at step k: the forces of step 12 are NaN, so step 13 moves atoms to NaN positions
    s = run_nve(atoms, nve(40), tmp_path, progress=False)
    assert s["status"].startswith("blow-up: calculator failed at step 13") and "NaN" in s["status"]
    data, _ = read_trajectory(tmp_path / "trajectory.h5")
    np.testing.assert_array_equal(data["step"], [0, 5, 10])
    assert np.isfinite(data["positions"]).all()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == s["status"]
    assert s["n_steps"] == 12 and np.isfinite(atoms.positions).all()  # atoms left at the last good frame


def test_hot_start_dissociates_and_is_caught_by_the_bond_check(tmp_path, tiny_calc):
    """The tiny model is nearly force-free, so at 5000 K the atoms fly apart within a few fs."""
    settings = MDSettings(
        "nvt", "bussi", temperature_K=5000.0, timestep_fs=0.5, n_steps=200, log_every=2, max_temperature_K=1e6
    )
    s = run_nvt(ethanol(tiny_calc), settings, tmp_path, progress=False)
    assert s["status"].startswith("blow-up: bond") and "from its reference length" in s["status"]
    data, _ = read_trajectory(tmp_path / "trajectory.h5")
    last = int(data["step"][-1])  # the offending frame is kept for diagnosis ...
    assert f"at step {last}" in s["status"] and last < 200
    assert load_checkpoint(tmp_path / "checkpoint.json")["step"] == last - 2  # ... but never resumed from
    assert (tmp_path / "energies.png").exists()


def test_temperature_limit(tmp_path, tiny_calc):
    s = run_nvt(
        ethanol(tiny_calc),
        MDSettings("nvt", "langevin", temperature_K=300.0, n_steps=20, log_every=5, max_temperature_K=100.0),
        tmp_path,
        progress=False,
    )
    assert s["status"] == "blow-up: temperature 300 K above 100 K at step 0"


# ---- command-line programs --------------------------------------------------------------------


def _cli(script, out, model, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(REPO / "md_protocols" / script),
        "--model",
        str(model),
        "--structure",
        "ethanol",
        "--dtype",
        "float64",
        "--time-ps",
        "0.005",
        "--log-every",
        "2",
        "--out",
        str(out),
        "--threads",
        "1",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    "script, extra",
    [
        ("nvt.py", ["--thermostat", "nose-hoover", "--taut", "20"]),
        ("nve.py", ["--equilibrate-ps", "0.002"]),
    ],
)
def test_cli_writes_trajectory_summary_and_plot(tmp_path, tiny_model_file, script, extra):
    proc = _cli(script, tmp_path, tiny_model_file, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ns/day" in proc.stderr  # tqdm postfix
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["n_steps"] == 10 and summary["model"] == str(tiny_model_file)
    assert summary["ns_per_day"] > 0 and summary["overhead_fraction"] >= 0
    with h5py.File(tmp_path / "trajectory.h5", "r") as f:
        assert f["positions"].shape == (6, 9, 3) and f.attrs["timestep_fs"] == 0.5
        assert json.loads(f.attrs["settings"])["ensemble"] == script[:3]
    assert (tmp_path / "energies.png").stat().st_size > 1000
    if script == "nve.py":
        assert summary["equilibration"]["n_steps"] == 4 and (tmp_path / "equilibration.h5").exists()
    # summarize.py recomputes the analysis of a stored run from its trajectory, keeping the rest
    import runpy

    stale = dict(summary, mean_temperature_K=-1.0)
    (tmp_path / "summary.json").write_text(json.dumps(stale))
    runpy.run_path(str(REPO / "md_protocols" / "summarize.py"), run_name="not_main")["main"]([str(tmp_path)])
    refreshed = json.loads((tmp_path / "summary.json").read_text())
    assert refreshed == summary
    # compare.py reads only the energy series and plots runs side by side
    data, _ = read_trajectory(tmp_path / "trajectory.h5", names=("time_ps", "total_energy"))
    assert sorted(data) == ["time_ps", "total_energy"] and len(data["time_ps"]) == 6
    with pytest.raises(KeyError, match="no dataset"):
        read_trajectory(tmp_path / "trajectory.h5", names=("forces",))
    compare = runpy.run_path(str(REPO / "md_protocols" / "compare.py"), run_name="not_main")["main"]
    assert compare([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000


def test_cli_refuses_to_overwrite_and_extends_with_restart(tmp_path, tiny_model_file, capsys):
    """In-process (the subprocess start costs ~10 s here): main() of nvt.py."""
    import runpy
    import signal

    main = runpy.run_path(str(REPO / "md_protocols" / "nvt.py"))["main"]
    args = [
        "--model",
        str(tiny_model_file),
        "--structure",
        "ethanol",
        "--dtype",
        "float64",
        "--log-every",
        "2",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--thermostat",
        "bussi",
    ]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(args + ["--time-ps", "0.004"]) == 0
        assert main(args + ["--time-ps", "0.004"]) == 2
        assert "--restart" in capsys.readouterr().err
        assert main(args + ["--time-ps", "0.006", "--restart"]) == 0
        assert main(args + ["--time-ps", "0.006", "--restart", "--timestep", "0.25"]) == 2
        assert main(args + ["--time-ps", "0.006", "--restart"]) == 0  # complete: integrates nothing
    finally:
        signal.signal(signal.SIGTERM, handler)
    data, _ = read_trajectory(tmp_path / "trajectory.h5")
    np.testing.assert_array_equal(data["step"], np.arange(0, 13, 2))
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the no-op restart keeps the speed of the last session that integrated (4 steps), not "nothing measured"
    assert summary["steps_this_session"] == 4 and summary["steps_per_second"] > 0 and summary["n_steps"] == 12


@pytest.mark.slow
def test_cli_survives_sigterm_and_sigkill(tmp_path):
    """Real signals on the real program (~40 s): SIGTERM flushes and exits 143, SIGKILL loses at most the
    frames after the last checkpoint, and each --restart continues to exactly the uninterrupted run."""
    import signal
    import time

    def launch(*extra):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [
            sys.executable,
            str(REPO / "md_protocols" / "nve.py"),
            "--model",
            "ethanol_fp32",
            "--structure",
            "ethanol",
            "--dtype",
            "float64",
            "--time-ps",
            "0.03",
            "--equilibrate-ps",
            "0",
            "--log-every",
            "2",
            "--flush-every",
            "1",
            "--seed",
            "5",
            "--out",
            str(tmp_path / "b"),
            "--no-progress",
            "--threads",
            "1",
            *extra,
        ]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def wait_for_step(proc, step):
        ckpt = tmp_path / "b" / "checkpoint.json"
        while proc.poll() is None:
            if ckpt.exists() and load_checkpoint(ckpt)["step"] >= step:
                return
            time.sleep(0.05)
        pytest.fail(f"finished before step {step}: {proc.stderr.read()[-2000:]}")

    proc = launch()
    wait_for_step(proc, 10)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "interrupted: SystemExit"
    proc = launch("--restart")
    wait_for_step(proc, 30)
    proc.kill()
    proc.wait(60)
    proc = launch("--restart")
    assert proc.wait(300) == 0, proc.stderr.read()[-2000:]

    atoms = load_structure("ethanol")
    atoms.calc = GAQCalculator("ethanol_fp32", dtype="float64")
    run_nve(
        atoms,
        MDSettings("nve", temperature_K=300.0, timestep_fs=0.5, n_steps=60, log_every=2, seed=5),
        tmp_path / "a",
        progress=False,
    )
    a = _assert_same_trajectory(tmp_path / "a", tmp_path / "b")
    np.testing.assert_array_equal(a["step"], np.arange(0, 61, 2))
