"""The ASE calculator: agreement with the eager model, ASE workflows, and clear errors on bad input."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.calculators.fd import calculate_numerical_forces
from helpers import calibrated_qat, ethanol_atoms

from gaq_calc import GAQCalculator, ModelFileError
from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.loading import load_model
from gaq_calc.model import energy_and_forces

SHIPPED = "ethanol_fp32"


@pytest.fixture(params=["tiny", "shipped"])
def calc(request, tiny_model_file):
    model = tiny_model_file if request.param == "tiny" else SHIPPED
    return GAQCalculator(model, dtype="float64")


def test_implemented_properties_declared_on_class():
    assert GAQCalculator.implemented_properties == ["energy", "free_energy", "forces"]
    from ase.calculators.calculator import Calculator

    assert "forces" not in getattr(Calculator, "implemented_properties", [])


def test_calculator_matches_eager_model(tiny_model_file):
    atoms = ethanol_atoms(5)
    atoms.calc = GAQCalculator(tiny_model_file, dtype="float64")
    model, _ = load_model(tiny_model_file, dtype=torch.float64)
    frames = read_frames("ethanol", "test").subset([5])
    e, f = energy_and_forces(model, GraphDataset(frames, [1, 6, 8], model.cutoff).collate([0]).to("cpu", torch.float64))
    assert atoms.get_potential_energy() == pytest.approx(e.item(), abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), f.detach().numpy(), atol=1e-10)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()


def test_shipped_model_resolves_by_name_and_is_accurate():
    atoms = ethanol_atoms(7)
    atoms.calc = GAQCalculator(SHIPPED)
    frames = read_frames("ethanol", "test")
    assert atoms.get_potential_energy() == pytest.approx(frames.energies[7], abs=0.05)
    assert np.abs(atoms.get_forces() - frames.forces[7]).mean() < 0.05


def test_forces_equal_finite_differences(calc):
    atoms = ethanol_atoms(3)
    atoms.calc = calc
    fd = calculate_numerical_forces(atoms, eps=1e-4, iatoms=[0, 4, 8])
    np.testing.assert_allclose(atoms.get_forces()[[0, 4, 8]], fd, atol=1e-5)


def test_no_stale_results_after_moving_atoms(tiny_model_file):
    atoms = ethanol_atoms(0)
    atoms.calc = GAQCalculator(tiny_model_file)
    e0 = atoms.get_potential_energy()
    atoms.positions[0, 0] += 0.1
    assert atoms.get_potential_energy() != e0
    atoms.positions[0, 0] -= 0.1
    assert atoms.get_potential_energy() == pytest.approx(e0, abs=1e-6)


def test_check_state_flags_every_change_the_model_sees(tiny_model_file):
    atoms = ethanol_atoms(0)
    calc = GAQCalculator(tiny_model_file)
    assert set(calc.check_state(atoms)) == set(all_changes)  # nothing computed yet
    atoms.calc = calc
    atoms.get_forces()
    assert calc.check_state(atoms) == []
    moved = atoms.copy()
    moved.positions[3, 1] += 1e-12  # far below any allclose tolerance ASE users set
    assert calc.check_state(moved) == ["positions"]
    swapped = atoms.copy()
    swapped.numbers[[0, 2]] = swapped.numbers[[2, 0]]
    assert "numbers" in calc.check_state(swapped)
    boxed = atoms.copy()
    boxed.cell = [20.0, 20.0, 20.0]
    boxed.pbc = True
    assert set(calc.check_state(boxed)) == {"cell", "pbc"}
    calls = []
    original = calc.calculate
    calc.calculate = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    atoms.get_forces()
    atoms.get_potential_energy()
    assert calls == []  # nothing changed: the cached results are returned
    atoms.positions[0, 0] += 1e-3
    atoms.get_forces()
    assert calls == [1]


def test_geometry_optimisation_bfgs():
    from ase.optimize import BFGS

    atoms = ethanol_atoms(11)
    atoms.calc = GAQCalculator(SHIPPED)
    e0 = atoms.get_potential_energy()
    assert BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_forces()).max() < 0.05


def test_vibrational_analysis(tmp_path):
    from ase.optimize import BFGS
    from ase.vibrations import Vibrations

    atoms = ethanol_atoms(11)
    atoms.calc = GAQCalculator(SHIPPED, dtype="float64")
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=500)
    vib = Vibrations(atoms, name=str(tmp_path / "vib"))
    vib.run()
    energies = vib.get_energies()
    real = np.sort(np.abs(energies.real))
    # 3N - 6 = 21 genuine modes; the 6 rigid-body modes sit near zero
    assert real[6:].min() > 0.01  # eV, > ~80 cm^-1
    assert real[:6].max() < real[6:].min()
    # O-H stretch of ethanol near 3600-3800 cm^-1 (PBE); C-H stretches around 3000
    assert 3300 < vib.get_frequencies().real.max() < 4100


def test_md_with_ase_integrator():
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from gaq_calc.md import maxwell_boltzmann

    atoms = ethanol_atoms(0)
    atoms.calc = GAQCalculator(SHIPPED, dtype="float64")
    maxwell_boltzmann(atoms, 300.0, np.random.default_rng(0))  # zero linear and angular momentum
    e0 = atoms.get_total_energy()
    VelocityVerlet(atoms, timestep=0.25 * units.fs).run(200)
    assert abs(atoms.get_total_energy() - e0) < 5e-3  # eV over 50 fs


# ---- bad input -------------------------------------------------------------------------------------


def test_unknown_element(tiny_model_file):
    atoms = ethanol_atoms(0)
    atoms.numbers[0] = 26
    atoms.calc = GAQCalculator(tiny_model_file)
    with pytest.raises(ValueError, match=r"\['Fe'\] are not known"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(tiny_model_file, bad):
    atoms = ethanol_atoms(0)
    atoms.positions[2, 1] = bad
    atoms.calc = GAQCalculator(tiny_model_file)
    with pytest.raises(ValueError, match="NaN or infinite"):
        atoms.get_forces()


def test_overlapping_atoms(tiny_model_file):
    atoms = ethanol_atoms(0)
    atoms.positions[4] = atoms.positions[1]
    atoms.calc = GAQCalculator(tiny_model_file)
    with pytest.raises(ValueError, match="overlap"):
        atoms.get_potential_energy()


def test_empty_structure(tiny_model_file):
    atoms = Atoms()
    atoms.calc = GAQCalculator(tiny_model_file)
    assert atoms.get_potential_energy() == 0.0
    assert atoms.get_forces().shape == (0, 3)


def test_isolated_atoms_have_zero_forces(tiny_model_file):
    atoms = Atoms("OH", positions=[[0, 0, 0], [0, 0, 6.0]])  # beyond the 5 Å cutoff: no edges
    atoms.calc = GAQCalculator(tiny_model_file, dtype="float64")
    e = atoms.get_potential_energy()
    np.testing.assert_array_equal(atoms.get_forces(), 0.0)
    atoms.positions[1] = [0, 7.0, 3.0]
    assert atoms.get_potential_energy() == pytest.approx(e, abs=1e-12)


def test_atoms_flown_apart_in_a_large_structure(tiny_model_file):
    rng = np.random.default_rng(0)
    atoms = Atoms(["H"] * 600, positions=rng.uniform(0, 30, size=(600, 3)))
    atoms.positions[0] = [1e6, 1e6, 1e6]
    atoms.calc = GAQCalculator(tiny_model_file)
    with pytest.raises(ValueError, match="flown apart"):
        atoms.get_potential_energy()


def test_bad_min_distance(tiny_model_file):
    with pytest.raises(ValueError, match="min_distance"):
        GAQCalculator(tiny_model_file, min_distance=0)


def test_forces_under_inference_mode(tiny_model_file):
    atoms = ethanol_atoms(0)
    atoms.calc = GAQCalculator(tiny_model_file)
    with torch.inference_mode():
        assert np.isfinite(atoms.get_forces()).all()


def test_periodic_cell_without_volume(tiny_model_file):
    atoms = ethanol_atoms(0)
    atoms.pbc = True  # but no cell
    atoms.calc = GAQCalculator(tiny_model_file)
    with pytest.raises(ValueError, match="non-zero volume"):
        atoms.get_potential_energy()


def test_periodic_cell_matches_isolated_when_large(tiny_model_file):
    atoms = ethanol_atoms(0)
    atoms.calc = GAQCalculator(tiny_model_file, dtype="float64")
    e_iso = atoms.get_potential_energy()
    boxed = atoms.copy()
    boxed.cell = [30, 30, 30]
    boxed.pbc = True
    boxed.calc = GAQCalculator(tiny_model_file, dtype="float64")
    assert boxed.get_potential_energy() == pytest.approx(e_iso, abs=1e-9)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="no model file"):
        GAQCalculator(tmp_path / "nope.pt")


def test_corrupt_model_file(tmp_path, tiny_model_file):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(tiny_model_file.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="not a readable"):
        GAQCalculator(bad)


def test_foreign_model_file(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match="not a gaq_calc model"):
        GAQCalculator(foreign)


def test_pickled_object_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "gaq_calc.model", "obj": Atoms("H")}, evil)  # arbitrary class, needs unpickling
    with pytest.raises(ModelFileError):
        GAQCalculator(evil)


def test_bad_dtype(tiny_model_file):
    with pytest.raises(ValueError, match="dtype"):
        GAQCalculator(tiny_model_file, dtype="float16")


def test_calculator_leaves_global_torch_state(tiny_model_file):
    before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())
    atoms = ethanol_atoms(0)
    atoms.calc = GAQCalculator(tiny_model_file, dtype="float64")
    with torch.no_grad():
        atoms.get_forces()
        assert not torch.is_grad_enabled()
    assert (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()) == before


def test_calculator_takes_a_network_in_memory(tiny_model_file, ethanol_frames):
    """A GAQPotential or a prepared (QAT) model in memory loads through the same path as its file; the
    calculator works on a copy, so the caller's model keeps its mode and dtype."""
    from gaq_calc.model.serialization import save_model
    from gaq_calc.quant import QuantLinear

    atoms = ethanol_atoms(2)
    model, _ = load_model(tiny_model_file)
    calc = GAQCalculator(model, dtype="float64")
    assert calc.model_path is None and calc.kernel == "fused"
    from_file = GAQCalculator(tiny_model_file, dtype="float64")
    assert calc.get_potential_energy(atoms) == from_file.get_potential_energy(atoms)
    assert model.embedding.weight.dtype == torch.float32
    q = calibrated_qat(ethanol_frames, "w4a8_frame")
    path = tiny_model_file.parent.parent / "qat_in_memory" / "model.pt"
    save_model(path, q, {"train_data": "ethanol"})
    for mode in ("quantized", "conservative"):
        in_memory = GAQCalculator(q, mode=mode, kernel="reference")
        from_file = GAQCalculator(str(path), mode=mode, kernel="reference")
        assert in_memory.get_potential_energy(atoms) == from_file.get_potential_energy(atoms)
        np.testing.assert_array_equal(in_memory.get_forces(atoms), from_file.get_forces(atoms))
    assert all(m.act_quantizer.enabled for m in q.modules() if isinstance(m, QuantLinear)) and not q.conservative
