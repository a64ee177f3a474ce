"""benchmarks/md_step_profile.py: the parts add up to the step, and every timing wrapper is put back."""

from pathlib import Path

import pytest
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "md_step_profile.py"


def _load():
    return load_script(SCRIPT, "md_step_profile")


profile = _load()


def test_exclusive_parts_add_up_to_the_step():
    t = {
        "op": 5.0,
        "kernel": 5.1,
        "neighbours": 0.1,
        "graph": 0.4,
        "base_calculate": 0.2,
        "calculate": 6.0,
        "check_state": 0.1,
        "get_forces": 6.3,
    }
    parts = profile.exclusive_parts(t, total=6.5)
    assert list(parts) == [name for name, _ in profile.PARTS]
    assert parts["kernel wrapper"] == pytest.approx(0.1) and parts["tensor construction"] == pytest.approx(0.3)
    assert parts["calculate, rest"] == pytest.approx(0.3) and parts["ASE get_forces, rest"] == pytest.approx(0.2)
    assert parts["ASE integrator"] == pytest.approx(0.2)
    assert sum(parts.values()) == pytest.approx(6.5)


def test_short_profile_runs_and_restores_what_it_wrapped(capsys):
    import torch
    from ase.calculators.calculator import Calculator

    import gaq_calc.calculator as calculator_module

    try:
        from gaq_calc.kernels import KernelUnavailable, load_extension

        load_extension()
    except KernelUnavailable as err:
        pytest.skip(f"fused kernel unavailable: {err}")
    before = (Calculator.calculate, calculator_module.neighbour_graph, torch.ops.gaq.energy_forces)
    threads = torch.get_num_threads()
    try:
        profile.main(["--steps", "3", "--blocks", "1", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| C++ kernel | gaq::Model.energy_forces |" in out and "| **step** |" in out
    assert "| check_state | GAQCalculator.check_state |" in out and "| 3 |" in out  # ASE asks 3 times per step
    assert (Calculator.calculate, calculator_module.neighbour_graph, torch.ops.gaq.energy_forces) == before
