import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from gaq_calc.data import (
    GraphDataset,
    fit_reference_energies,
    neighbour_graph,
    read_frames,
    read_rmd17,
    shipped_split,
    species_index,
    train_val_split,
)
from gaq_calc.units import KCAL_PER_MOL_TO_EV


def test_kcal_conversion_matches_definition():
    # 1 kcal/mol = 4184 J / N_A = 0.0433641 eV
    assert pytest.approx(4184.0 / 6.02214076e23 / 1.602176634e-19, rel=1e-6) == KCAL_PER_MOL_TO_EV


def test_rmd17_read_converts_units():
    raw = np.load(shipped_split("ethanol", "test"))
    frames = read_rmd17(shipped_split("ethanol", "test"))
    assert len(frames) == 1000
    np.testing.assert_allclose(frames.energies, raw["energies"] * KCAL_PER_MOL_TO_EV)
    np.testing.assert_allclose(frames.forces[3], raw["forces"][3] * KCAL_PER_MOL_TO_EV)
    np.testing.assert_array_equal(frames.positions[3], raw["coords"][3])
    assert frames.species == [1, 6, 8]
    assert frames.energies.dtype == np.float64


def test_shipped_splits_are_disjoint():
    for molecule in ("ethanol", "azobenzene"):
        train = np.load(shipped_split(molecule, "train"))["old_indices"]
        test = np.load(shipped_split(molecule, "test"))["old_indices"]
        assert len(np.intersect1d(train, test)) == 0


def test_validation_split_is_carved_from_training():
    train, val = train_val_split(1000, 50, seed=0)
    assert len(train) == 950 and len(val) == 50
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(train_val_split(1000, 50, seed=0)[1], val)


def test_extxyz_round_trip(tmp_path):
    images = []
    rng = np.random.default_rng(0)
    for k in range(3):
        atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
        forces = rng.normal(size=(3, 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 - k, forces=forces)
        images.append(atoms)
    write(tmp_path / "water.extxyz", images)
    frames = read_frames(tmp_path / "water.extxyz")
    assert len(frames) == 3
    np.testing.assert_allclose(frames.energies, [-10, -11, -12])
    np.testing.assert_allclose(frames.forces[1], images[1].get_forces())


def test_ase_file_without_labels_is_rejected(tmp_path):
    write(tmp_path / "bare.xyz", Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]]))
    with pytest.raises(ValueError, match="no energy/forces"):
        read_frames(tmp_path / "bare.xyz")


def test_reference_energies_reproduce_compositions():
    from gaq_calc.data.frames import Frames

    true = {1: -13.6, 6: -1030.0, 8: -2040.0}
    numbers = [np.array(n) for n in ([1, 1, 8], [6, 1, 1, 1, 1], [6, 8], [1, 1], [6, 6, 1, 1])]
    energies = np.array([sum(true[z] for z in n) for n in numbers])
    frames = Frames(
        numbers, [np.zeros((len(n), 3)) for n in numbers], energies, [np.zeros((len(n), 3)) for n in numbers]
    )
    ref = fit_reference_energies(frames, [1, 6, 8])
    np.testing.assert_allclose(ref, [true[1], true[6], true[8]], rtol=1e-10)
    assert ref.dtype == np.float64


def test_reference_energies_single_molecule_reproduce_mean(ethanol_frames):
    ref = fit_reference_energies(ethanol_frames, [1, 6, 8])
    counts = np.array([6, 2, 1])  # C2H5OH
    assert counts @ ref == pytest.approx(ethanol_frames.energies.mean(), abs=1e-6)


def test_neighbour_graph_against_brute_force():
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 6, size=(20, 3))
    r, s, shifts = neighbour_graph(pos, 3.0)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    expected = {(i, j) for i in range(20) for j in range(20) if i != j and d[i, j] < 3.0}
    assert set(zip(r.tolist(), s.tolist())) == expected
    assert np.all(shifts == 0)


def test_unknown_element_error_names_it():
    with pytest.raises(ValueError, match=r"\['N'\].*not known"):
        species_index(np.array([1, 7, 6]), [1, 6, 8])


def test_batch_offsets(ethanol_frames):
    ds = GraphDataset(ethanol_frames, [1, 6, 8], 5.0)
    batch = ds.collate([0, 1, 2])
    assert batch.positions.shape == (27, 3)
    assert batch.receivers.max() < 27 and batch.senders.max() < 27
    # every edge stays inside its structure
    assert (batch.batch[batch.receivers] == batch.batch[batch.senders]).all()
    assert batch.n_atoms_per_graph.tolist() == [9, 9, 9]


def test_neighbour_graph_planar_and_linear_molecules():
    planar = np.array([[0.0, 0, 0], [1.4, 0, 0], [0.7, 1.2, 0]])
    r, _s, _ = neighbour_graph(planar, 5.0)
    assert len(r) == 6
    linear = np.array([[0.0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]])
    assert len(neighbour_graph(linear, 2.0)[0]) == 4


def test_periodic_training_frames_are_rejected(tmp_path):
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], cell=[5, 5, 5], pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((2, 3)))
    write(tmp_path / "pbc.extxyz", atoms)
    with pytest.raises(ValueError, match="periodic"):
        read_frames(tmp_path / "pbc.extxyz")


def test_brute_force_and_matscipy_graphs_agree():
    from gaq_calc.data import graphs

    rng = np.random.default_rng(2)
    pos = rng.uniform(0, 12, size=(600, 3))
    r, s, _ = neighbour_graph(pos, 4.0)  # > BRUTE_FORCE_MAX_ATOMS: matscipy
    r2, s2, _ = neighbour_graph(pos[:300], 4.0)  # brute force
    keep = (r < 300) & (s < 300)
    assert set(zip(r[keep].tolist(), s[keep].tolist())) == set(zip(r2.tolist(), s2.tolist()))
    assert graphs.BRUTE_FORCE_MAX_ATOMS < 600
