"""gaq-nve / gaq-nvt (gaq_calc.cli.nve, nvt): the same programs as md_protocols/nve.py, nvt.py; they print
the drift and the speed, and never write into a folder that holds files unless asked to continue it."""

import json
import runpy
import signal
from pathlib import Path

import pytest

from gaq_calc.cli import nve, nvt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keep_sigterm():
    handler = signal.getsignal(signal.SIGTERM)  # the programs install their own
    yield
    signal.signal(signal.SIGTERM, handler)


def test_md_protocols_scripts_are_the_console_scripts():
    assert runpy.run_path(str(REPO / "md_protocols" / "nve.py"))["main"] is nve.main
    assert runpy.run_path(str(REPO / "md_protocols" / "nvt.py"))["main"] is nvt.main


def test_short_nve_prints_drift_and_speed_and_refuses_a_used_folder(tmp_path, tiny_model_file, capsys, keep_sigterm):
    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_model_file),
        "--structure",
        "ethanol",
        "--dtype",
        "float64",
        "--time-ps",
        "0.01",
        "--equilibrate-ps",
        "0",
        "--log-every",
        "2",
        "--no-progress",
        "--out",
        str(out),
        "--bond-tolerance",
        "3",
    ]  # (an untrained tiny model: bonds stretch)
    assert nve.main(args) == 0
    stdout = capsys.readouterr().out
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("NVE 0.01 ps: energy drift") and "meV/atom/ps" in line and "ns/day" in line
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert nve.main(args) == 2  # the same command again: refused, nothing touched
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--restart" in err and str(out) in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_folder_with_other_files_is_refused_before_the_model_loads(tmp_path, capsys, keep_sigterm):
    (tmp_path / "notes.txt").write_text("mine")
    # a model that does not exist: the refusal must come first
    assert nvt.main(["--model", "no-such-model", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
