"""The calculator's per-call fast path: a neighbour list with a skin gives the very bits of a fresh list."""

import numpy as np
import pytest
from ase import Atoms

from gaq_calc import GAQCalculator
from gaq_calc.md import load_structure


def _pair(model, **kwargs):
    try:
        return GAQCalculator(model, skin=0.3, **kwargs), GAQCalculator(model, skin=0, **kwargs)
    except Exception as err:  # pragma: no cover - no compiler
        pytest.skip(f"calculator unavailable: {err}")


def _same(a, b, atoms):
    ea, fa = a.get_potential_energy(atoms), a.get_forces(atoms)
    eb, fb = b.get_potential_energy(atoms), b.get_forces(atoms)
    assert ea == eb and np.array_equal(fa, fb)
    return fa


@pytest.mark.parametrize("mode", ["conservative", "quantized"])
def test_skin_list_gives_the_bits_of_a_fresh_list(mode):
    skin, fresh = _pair("azobenzene_w4a8.pt", mode=mode)
    atoms = load_structure("azobenzene", 0)
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    rebuilds = 0
    for step in range(40):  # a random walk: the kept list is reused, then rebuilt when atoms move far
        atoms.positions = base + np.cumsum(rng.normal(scale=0.03, size=(1,) + base.shape), 0)[0] * (1 + step / 10)
        kept = skin._list
        _same(skin, fresh, atoms)
        rebuilds += skin._list is not kept
    assert 1 < rebuilds < 40


def test_skin_list_of_a_large_cluster_matches_a_fresh_list():
    """Above 512 atoms both lists come from matscipy; the kept one is sorted like the all-pairs list."""
    skin, fresh = _pair("azobenzene_fp32")
    mol = load_structure("azobenzene", 0)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) * 9.0
    atoms = Atoms(
        numbers=np.tile(mol.numbers, len(grid)),
        positions=np.concatenate([mol.positions - mol.positions.mean(0) + g for g in grid]),
    )
    assert len(atoms) > 512
    rng = np.random.default_rng(1)
    base = atoms.positions.copy()
    for scale in (0.0, 0.05, 0.2):
        atoms.positions = base + rng.normal(scale=scale, size=base.shape)
        _same(skin, fresh, atoms)


def test_periodic_structures_get_a_fresh_list():
    skin, fresh = _pair("azobenzene_fp32")
    atoms = load_structure("azobenzene", 0)
    atoms.center(vacuum=4.0)
    atoms.pbc = True
    _same(skin, fresh, atoms)
    assert skin._list is None
