"""Data safety of the MD protocols (issue 18): a refused restart changes no file, saved frames and
checkpoints are never lost, bad input fails before anything is written with a one-line error, and a
full disk ends in a clear error with the saved frames intact.

Runs are a few tens of steps of the tiny untrained model; the command-line programs run in-process
(main(argv)) except where a real write failure needs a process of its own.
"""

import errno
import os
import runpy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ase.io import write
from helpers import ethanol, nve

from gaq_calc.md import MDSettings, RestartError, load_structure, read_trajectory, run_nve, run_nvt
from gaq_calc.md.trajectory import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def nvt(n_steps, thermostat="langevin", **kw) -> MDSettings:
    return MDSettings(
        "nvt", thermostat, temperature_K=300.0, timestep_fs=0.5, n_steps=n_steps, log_every=5, seed=3, taut_fs=5.0, **kw
    )


def files_state(folder) -> dict:
    """Every file under folder: its bytes and modification time (a refused restart changes neither)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


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
    return [
        "--model",
        str(model),
        "--structure",
        "ethanol",
        "--dtype",
        "float64",
        "--log-every",
        "2",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


# ---- item 2: a restart must continue the same system ------------------------------------------


def _deuterate(atoms):
    masses = atoms.get_masses()
    masses[atoms.numbers == 1] = 2.014
    atoms.set_masses(masses)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.set_atomic_numbers([6, 8, 6, 1, 1, 1, 1, 1, 1]), "atomic numbers"),
        (_deuterate, "masses"),
        (lambda a: a.set_cell([12.0, 12.0, 12.0]), "cell"),
        (lambda a: (a.set_cell([12.0, 12.0, 12.0]), a.set_pbc(True)), "pbc"),
    ],
)
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


# ---- item 3: saved frames and checkpoints are never lost ---------------------------------------


@pytest.mark.parametrize(
    "settings, warning",
    [
        (nve, "not bit-exact"),
        (nvt, "random"),
        (lambda n: nvt(n, "nose-hoover"), "chain"),
    ],
)
def test_restart_without_checkpoint_continues_from_the_last_frame(tmp_path, tiny_calc, settings, warning):
    """checkpoint.json lost: the restart keeps every saved frame and continues from the last one (the
    state in the trajectory: positions, velocities, step), warning that it is not bit-exact. The restart
    is given another frame of the input structure, so a run started afresh would not match frame 0."""
    run = run_nve if settings(1).ensemble == "nve" else run_nvt
    run(ethanol(tiny_calc), settings(20), tmp_path / "b", progress=False)
    saved, _ = read_trajectory(tmp_path / "b" / "trajectory.h5")
    (tmp_path / "b" / "checkpoint.json").unlink()
    with pytest.warns(RuntimeWarning, match=warning):
        s = run(ethanol(tiny_calc, frame=1), settings(30), tmp_path / "b", restart=True, progress=False)
    assert s["status"] == "completed" and s["steps_this_session"] == 10
    data, _ = read_trajectory(tmp_path / "b" / "trajectory.h5")
    np.testing.assert_array_equal(data["step"], np.arange(0, 31, 5))
    for name, values in saved.items():  # the saved frames, bit for bit
        np.testing.assert_array_equal(data[name][:5], values, err_msg=name)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.json")["step"] == 30
    if run is run_nve:  # deterministic: the same run as uninterrupted, to rounding of the stored velocities
        run_nve(ethanol(tiny_calc), settings(30), tmp_path / "a", progress=False)
        a, _ = read_trajectory(tmp_path / "a" / "trajectory.h5")
        np.testing.assert_allclose(data["positions"], a["positions"], rtol=0, atol=1e-9)


def test_restart_without_checkpoint_after_a_blow_up_is_refused(tmp_path, tiny_calc):
    """The last frame of a blown-up run is the broken one (kept for diagnosis): without the checkpoint
    there is no good state to continue from, and nothing may be dropped to find one."""
    hot = MDSettings(
        "nvt", "bussi", temperature_K=5000.0, timestep_fs=0.5, n_steps=200, log_every=2, max_temperature_K=1e6
    )
    assert run_nvt(ethanol(tiny_calc), hot, tmp_path, progress=False)["status"].startswith("blow-up: bond")
    (tmp_path / "checkpoint.json").unlink()
    before = files_state(tmp_path)
    with pytest.raises(RestartError, match="bond"):
        run_nvt(ethanol(tiny_calc), hot, tmp_path, restart=True, progress=False)
    assert files_state(tmp_path) == before


@pytest.mark.parametrize("content", ["", '{"step": 10, "positions": [[1.0, 2.'])
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, tiny_model_file, tiny_calc, capsys, content):
    run_nvt(ethanol(tiny_calc), nvt(10), tmp_path, progress=False)
    (tmp_path / "checkpoint.json").write_text(content)
    before = files_state(tmp_path)
    with pytest.raises(RestartError, match="checkpoint.json") as err:
        run_nvt(ethanol(tiny_calc), nvt(20), tmp_path, restart=True, progress=False)
    assert "\n" not in str(err.value)
    status, lines = cli("nvt.py", cli_args(tiny_model_file, tmp_path, "--restart"), capsys)
    assert status == 2 and len(lines) == 1 and "checkpoint.json" in lines[0], lines
    assert files_state(tmp_path) == before


def test_fresh_run_never_overwrites_a_checkpoint(tmp_path, tiny_calc):
    run_nvt(ethanol(tiny_calc), nvt(10), tmp_path, progress=False)
    (tmp_path / "trajectory.h5").rename(tmp_path / "moved.h5")
    before = files_state(tmp_path)
    with pytest.raises(FileExistsError, match="checkpoint.json"):
        run_nvt(ethanol(tiny_calc), nvt(10), tmp_path, progress=False)
    assert files_state(tmp_path) == before


def test_stale_checkpoint_never_truncates_the_trajectory(tmp_path, tiny_calc):
    """A checkpoint older than the trajectory (restored from a backup, say) would make the restart cut
    the frames after it. A kill leaves at most one flush batch after the checkpoint; more is refused."""
    run_nve(ethanol(tiny_calc), nve(10, flush_every=2), tmp_path, progress=False)
    old = (tmp_path / "checkpoint.json").read_bytes()
    run_nve(ethanol(tiny_calc), nve(40, flush_every=2), tmp_path, restart=True, progress=False)
    (tmp_path / "checkpoint.json").write_bytes(old)
    before = files_state(tmp_path)
    with pytest.raises(RestartError, match="after the checkpoint"):
        run_nve(ethanol(tiny_calc), nve(50, flush_every=2), tmp_path, restart=True, progress=False)
    assert files_state(tmp_path) == before


# ---- item 9: bad input fails up front, with one line ------------------------------------------


@pytest.mark.parametrize(
    "script, extra, option",
    [
        ("nvt.py", ["--timestep", "0"], "--timestep"),
        ("nvt.py", ["--timestep", "-0.5"], "--timestep"),
        ("nvt.py", ["--temperature", "nan"], "--temperature"),
        ("nvt.py", ["--temperature", "-1"], "--temperature"),
        ("nvt.py", ["--time-ps", "inf"], "--time-ps"),
        ("nvt.py", ["--friction", "nan"], "--friction"),
        ("nvt.py", ["--taut", "0"], "--taut"),
        ("nvt.py", ["--tchain", "0"], "--tchain"),
        ("nvt.py", ["--log-every", "0"], "--log-every"),
        ("nvt.py", ["--flush-every", "0"], "--flush-every"),
        ("nvt.py", ["--flush-seconds", "nan"], "--flush-seconds"),
        ("nvt.py", ["--max-temperature=-inf"], "--max-temperature"),
        ("nvt.py", ["--timestep", "abc"], "--timestep"),  # argparse's own errors are one line too
        ("nvt.py", ["--bond-tolerance", "-0.1"], "--bond-tolerance"),
        ("nvt.py", ["--seed", "-1"], "--seed"),
        ("nvt.py", ["--threads", "0"], "--threads"),
        ("nvt.py", ["--frame", "-1"], "--frame"),
        ("nvt.py", ["--frame", "1000"], "--frame"),  # the shipped ethanol split has frames 0-999
        ("nve.py", ["--equilibrate-ps", "nan"], "--equilibrate-ps"),
        ("nve.py", ["--friction", "inf"], "--friction"),
    ],
)
def test_cli_rejects_bad_arguments_before_writing(tmp_path, tiny_model_file, capsys, script, extra, option):
    out = tmp_path / "run"
    status, lines = cli(script, cli_args(tiny_model_file, out, "--time-ps", "0.004", *extra), capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], lines
    assert not out.exists()


def test_cli_structure_problems_are_one_line_errors(tmp_path, tiny_model_file, capsys):
    two = tmp_path / "two.extxyz"
    write(two, [load_structure("ethanol", 0), load_structure("ethanol", 1)])
    for structure, frame, expected in ((two, "2", "2 frames"), (tmp_path / "missing.xyz", "0", "missing.xyz")):
        argv = cli_args(tiny_model_file, tmp_path / "run", "--time-ps", "0.004", "--frame", frame)
        argv[argv.index("ethanol")] = str(structure)
        status, lines = cli("nvt.py", argv, capsys)
        assert status == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_unknown_element_is_refused_before_anything_is_written(tmp_path, tiny_model_file, tiny_calc, capsys):
    """Sulfur in a model trained on H, C, O: a clear error, not a 'blow-up' with an empty trajectory."""
    thiol = ethanol(tiny_calc)
    thiol.set_atomic_numbers([6, 6, 16, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"not known to this model"):
        run_nvt(thiol, nvt(10), tmp_path / "lib", progress=False)
    assert not (tmp_path / "lib").exists() or not any((tmp_path / "lib").iterdir())
    write(tmp_path / "thiol.extxyz", thiol)
    for script in ("nvt.py", "nve.py"):
        argv = cli_args(tiny_model_file, tmp_path / script, "--time-ps", "0.004")
        argv[argv.index("ethanol")] = str(tmp_path / "thiol.extxyz")
        status, lines = cli(script, argv, capsys)
        assert status == 2 and len(lines) == 1 and "not known to this model" in lines[0], lines
        assert not (tmp_path / script).exists() or not any((tmp_path / script).iterdir())


# ---- item 9: a full disk ----------------------------------------------------------------------

DISK_FULL_CHILD = textwrap.dedent("""
    import os, resource, runpy, sys
    from gaq_calc import GAQCalculator

    out, limit_after = sys.argv[1], int(sys.argv[2])
    calculate, calls = GAQCalculator.calculate, [0]

    def calculate_then_fill_the_disk(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == limit_after:  # from now on trajectory.h5 cannot grow (writes fail with EFBIG)
            size = os.path.getsize(os.path.join(out, "trajectory.h5"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
        return calculate(self, *args, **kwargs)

    GAQCalculator.calculate = calculate_then_fill_the_disk
    sys.exit(runpy.run_path(sys.argv[3])["main"](sys.argv[4:]))
""")


def test_full_disk_ends_in_a_clear_error_and_keeps_the_saved_frames(tmp_path, tiny_model_file, tiny_calc):
    """A real write failure: mid-run, trajectory.h5 may no longer grow (a file-size limit; HDF5 sees the
    same failed write(2) as on a full disk). HDF5 cannot recover from a failed write (it used to crash
    the program with a segfault), so the writer must stop before it. Frames flushed until then stay
    intact, the checkpoint points at the last of them, and --restart continues exactly."""
    out = tmp_path / "b"
    argv = [
        "--model",
        str(tiny_model_file),
        "--structure",
        "ethanol",
        "--dtype",
        "float64",
        "--temperature",
        "1",
        "--equilibrate-ps",
        "0",
        "--time-ps",
        "0.15",
        "--log-every",
        "1",
        "--flush-every",
        "10",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(out), "50", str(REPO / "md_protocols" / "nve.py"), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error:") and "--restart" in err[0], err
    data, _ = read_trajectory(out / "trajectory.h5")
    last = int(data["step"][-1])
    np.testing.assert_array_equal(data["step"], np.arange(last + 1))
    assert 40 <= last < 300 and load_checkpoint(out / "checkpoint.json")["step"] == last

    settings = MDSettings("nve", temperature_K=1.0, timestep_fs=0.5, n_steps=300, log_every=1, seed=0)
    run_nve(ethanol(tiny_calc), settings, tmp_path / "a", progress=False)
    s = run_nve(ethanol(tiny_calc), settings, out, restart=True, progress=False)
    assert s["status"] == "completed" and s["steps_this_session"] == 300 - last
    a, _ = read_trajectory(tmp_path / "a" / "trajectory.h5")
    b, _ = read_trajectory(out / "trajectory.h5")
    np.testing.assert_array_equal(a["step"], b["step"])
    np.testing.assert_allclose(b["positions"], a["positions"], rtol=0, atol=1e-10)


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tiny_calc, monkeypatch):
    """ENOSPC while writing checkpoint.json: the write is atomic, so the previous checkpoint survives
    and no temporary file is left; the error names the file; --restart continues exactly."""
    import gaq_calc.md.trajectory as trajectory

    fsync, calls = os.fsync, [0]

    def fsync_then_disk_full(fd):
        calls[0] += 1
        if calls[0] >= 2:  # the first checkpoint (step 0) is written, the next one is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(trajectory.os, "fsync", fsync_then_disk_full)
    with pytest.raises(OSError, match="checkpoint.json") as err:
        run_nve(ethanol(tiny_calc), nve(20, flush_every=1), tmp_path / "b", progress=False)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.json", "trajectory.h5"]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.json")["step"] == 0
    data, _ = read_trajectory(tmp_path / "b" / "trajectory.h5")  # the file was closed properly
    np.testing.assert_array_equal(data["step"], [0, 5])
    run_nve(ethanol(tiny_calc), nve(20), tmp_path / "b", restart=True, progress=False)
    run_nve(ethanol(tiny_calc), nve(20), tmp_path / "a", progress=False)
    a, _ = read_trajectory(tmp_path / "a" / "trajectory.h5")
    b, _ = read_trajectory(tmp_path / "b" / "trajectory.h5")
    np.testing.assert_array_equal(a["step"], b["step"])
    np.testing.assert_allclose(b["positions"], a["positions"], rtol=0, atol=1e-10)
