"""GAQCalculator.energies_and_forces: many structures in one kernel call, same numbers as one call each."""

import numpy as np
import pytest
from ase import Atoms

from gaq_calc import GAQCalculator
from gaq_calc.md.protocols import load_structure


def _single(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def _mixed_ethanol():
    """Mixed sizes and kinds: molecules, a fragment, an empty structure, a periodic box."""
    rng = np.random.default_rng(0)
    base = load_structure("ethanol")
    moved = base.copy()
    moved.positions += rng.normal(scale=0.05, size=moved.positions.shape)
    fragment = base[:5]
    periodic = base.copy()
    periodic.set_cell([6.0, 6.5, 7.0])
    periodic.set_pbc(True)
    periodic.center()
    return [base, fragment, Atoms(), moved, periodic, load_structure("ethanol", 7)]


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_batch_equals_single_calls_for_mixed_sizes(tiny_model_file, kernel):
    calc = GAQCalculator(tiny_model_file, dtype="float64", kernel=kernel)
    structures = _mixed_ethanol()
    energies, forces = calc.energies_and_forces(structures)
    assert energies.shape == (len(structures),) and energies.dtype == np.float64
    assert [f.shape for f in forces] == [(len(a), 3) for a in structures]
    assert energies[2] == 0.0
    for atoms, e, f in zip(structures, energies, forces):
        e1, f1 = _single(calc, atoms)
        assert abs(e - e1) < 1e-9
        np.testing.assert_allclose(f, f1, rtol=1e-9, atol=1e-12)
    assert abs(energies[0] - energies[1]) > 1e-3  # the fragment is not the molecule: no mixing up


def test_batch_of_azobenzene_replicas_with_the_shipped_artifact():
    """W4A8 artifact (float32, fused kernel, conservative mode): 8 replicas and a fragment."""
    calc = GAQCalculator("azobenzene_w4a8.pt")
    rng = np.random.default_rng(1)
    base = load_structure(None)
    replicas = []
    for _ in range(8):
        atoms = base.copy()
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        replicas.append(atoms)
    replicas.append(base[:10])
    energies, forces = calc.energies_and_forces(replicas)
    for atoms, e, f in zip(replicas, energies, forces):
        e1, f1 = _single(calc, atoms)
        assert abs(e - e1) < 1e-4
        np.testing.assert_allclose(f, f1, rtol=0, atol=1e-4)
    assert np.ptp(energies[:8]) > 1e-3


def test_one_kernel_call_and_no_change_to_the_calculators_state(tiny_model_file):
    calc = GAQCalculator(tiny_model_file, dtype="float64")
    atoms = load_structure("ethanol")
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    results = dict(calc.results)
    calls = []
    inner = calc.energy_forces

    def counting(*args):
        calls.append(args[-1])  # n_graphs
        return inner(*args)

    calc.energy_forces = counting
    calc.energies_and_forces(_mixed_ethanol())
    assert calls == [5]  # one call for the five non-empty structures
    assert calc.results == results and calc.atoms == atoms and atoms.get_potential_energy() == e0
    assert calc.energies_and_forces([]) == (pytest.approx(np.zeros(0)), [])


def test_bad_structures_are_named_by_index(tiny_model_file):
    calc = GAQCalculator(tiny_model_file, dtype="float64")
    good = load_structure("ethanol")
    with pytest.raises(ValueError, match="structure 1: elements .*N.* are not known"):
        calc.energies_and_forces([good, Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])])
    overlapping = good.copy()
    overlapping.positions[1] = overlapping.positions[0] + 0.01
    with pytest.raises(ValueError, match="structure 2: atoms .* overlap"):
        calc.energies_and_forces([good, good, overlapping])
