"""Numerical safety: results that do not depend on where a molecule sits, structures without edges,
clear errors for bad training data and for neighbour lists that would not fit in memory."""

import re

import numpy as np
import pytest
import torch
from ase import Atoms

from gaq_calc import GAQCalculator
from gaq_calc.data import GraphDataset, read_frames, shipped_split
from gaq_calc.loading import load_model
from gaq_calc.model import energy_and_forces
from gaq_calc.models_dir import resolve_model

FAR = np.array([1e6, -1e6, 1e6])


def ethanol_atoms(k=0):
    frames = read_frames("ethanol", "test")
    return Atoms(numbers=frames.numbers[k], positions=frames.positions[k])


def _energy_forces(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


# ---- item 5: absolute positions far from the origin ------------------------------------------------------


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("periodic", [False, True])
def test_results_do_not_depend_on_where_the_molecule_sits(kernel, periodic):
    atoms = ethanol_atoms(2)
    if periodic:  # a small cell: edges to periodic images exist (shifts are not all zero)
        atoms.cell = np.diag([7.0, 7.5, 8.0])
        atoms.pbc = True
    calc = GAQCalculator("ethanol_fp32", kernel=kernel)  # float32
    e0, f0 = _energy_forces(calc, atoms)
    moved = atoms.copy()
    moved.translate(FAR + np.array([0.31, 1.7, -2.9]))  # not a lattice vector: atoms wrap differently
    e1, f1 = _energy_forces(calc, moved)
    assert calc.kernel == kernel
    assert abs(e1 - e0) < 2e-5  # float32 rounding of edge vectors (~1e-6 eV), not of 1e6 Å coordinates (0.2 eV)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=5e-5)
    if periodic:  # a lattice translation far away, and one atom moved by a lattice vector
        lattice = atoms.copy()
        lattice.translate(np.array([1e5, -2e5, 3e5]) @ atoms.cell.array)
        lattice.positions[3] += atoms.cell.array[1] * 7
        e2, f2 = _energy_forces(calc, lattice)
        assert abs(e2 - e0) < 2e-5
        np.testing.assert_allclose(f2, f0, rtol=0, atol=5e-5)


def test_training_batches_do_not_depend_on_where_the_molecule_sits():
    frames = read_frames("ethanol", "test").subset([1, 2])
    moved = read_frames("ethanol", "test").subset([1, 2])
    moved.positions = [moved.positions[0] + FAR, moved.positions[1] - 3 * FAR]
    dtype = torch.float32
    model, _ = load_model(resolve_model("ethanol_fp32"), dtype=torch.float32)
    species = [int(z) for z in model.atomic_numbers]
    e0, f0 = energy_and_forces(model, GraphDataset(frames, species, model.cutoff).collate([0, 1]).to("cpu", dtype))
    e1, f1 = energy_and_forces(model, GraphDataset(moved, species, model.cutoff).collate([0, 1]).to("cpu", dtype))
    torch.testing.assert_close(e1, e0, rtol=0, atol=2e-5)
    torch.testing.assert_close(f1, f0, rtol=0, atol=5e-5)


# ---- item 8: structures without edges ------------------------------------------------------------------

NO_EDGE_MODELS = [
    ("azobenzene_fp32", "conservative"),
    ("azobenzene_w4a8", "conservative"),
    ("azobenzene_w4a8", "quantized"),
    ("azobenzene_w4a8.pt", "conservative"),
    ("azobenzene_w4a8.pt", "quantized"),
]


@pytest.mark.parametrize("kernel", ["auto", "fused", "reference"])
@pytest.mark.parametrize("model,mode", NO_EDGE_MODELS)
def test_atoms_without_neighbours(model, mode, kernel):
    """One atom, and two atoms farther apart than the cutoff: no edges. Every model, mode and kernel
    gives finite energies, zero forces, and the energy of two far atoms is the sum of theirs alone."""
    from gaq_calc.kernels import KernelUnavailable

    try:
        calc = GAQCalculator(model, mode=mode, kernel=kernel)
    except KernelUnavailable as err:  # eager QAT in quantized mode, MDDQ rounding: reference kernel only
        assert kernel == "fused" and mode == "quantized", err
        pytest.skip(f"not on the fused kernel: {err}")
    far = 3 * calc.cutoff
    e_c, f_c = _energy_forces(calc, Atoms("C"))
    e_n, f_n = _energy_forces(calc, Atoms("N", positions=[[0.5, -1.0, 2.0]]))
    e_cn, f_cn = _energy_forces(calc, Atoms("CN", positions=[[0.0, 0.0, 0.0], [far, 0.3, -0.2]]))
    assert np.isfinite([e_c, e_n, e_cn]).all()
    assert f_c.shape == (1, 3) and f_cn.shape == (2, 3)
    assert not np.abs(np.concatenate([f_c, f_n, f_cn])).any()
    assert e_cn == pytest.approx(e_c + e_n, abs=1e-5)


def test_quantizers_take_empty_inputs():
    """The edge activations of a structure without edges are empty: no division by their count, and a
    calibration pass over them leaves the range to the batches that have edges."""
    from torch import nn

    from gaq_calc.quant import QuantLinear
    from gaq_calc.quant.primitives import fake_quantize, fibonacci_sphere, mddq

    step = torch.tensor(0.1, requires_grad=True)
    x = torch.zeros(0, 8, requires_grad=True)
    fake_quantize(x, step, 8).sum().backward()
    assert step.grad.item() == 0 and x.grad.shape == (0, 8)
    codebook = torch.from_numpy(fibonacci_sphere(16)).float()
    assert mddq(torch.zeros(0, 3), codebook, torch.tensor(0.1), 4).shape == (0, 3)
    for branch, method, shape in [
        ("scalar", "mddq", (0, 4)),
        ("vector", "mddq", (0, 3, 4)),
        ("vector", "frame", (0, 3, 4)),
        ("vector", "cartesian", (0, 3, 4)),
    ]:
        q = QuantLinear(nn.Linear(4, 2, bias=False), branch, 4, 8, vector_method=method)
        act = q.act_quantizer
        act.observing = True
        assert q(torch.zeros(shape)).shape[:-1] == shape[:-1]
        assert not bool(act.calibrated)  # nothing seen yet
        q(torch.ones((2,) + shape[1:]))
        assert bool(act.calibrated) and act.step_size().item() > 0


# ---- item 9: training data with NaN/inf labels; periodic cells with much vacuum -------------------------


def _rmd17_file(path, k, key, value):
    """12 ethanol frames as an rMD17 npz, with `key`[k] (one number of frame k) set to `value`."""
    with np.load(shipped_split("ethanol", "train")) as raw:
        data = {name: raw[name][:12].copy() if raw[name].ndim else raw[name] for name in raw.files}
    if data[key].ndim == 1:
        data[key][k] = value
    else:
        data[key][k, 2, 1] = value
    np.savez(path, **data)
    return path


def _extxyz_file(path, k, what, value):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = read_frames("ethanol", "train").subset(np.arange(8))
    images = []
    for i in range(len(frames)):
        energy, forces = frames.energies[i], frames.forces[i].copy()
        if i == k and what == "energy":
            energy = value
        if i == k and what == "forces":
            forces[2, 1] = value
        atoms = Atoms(numbers=frames.numbers[i], positions=frames.positions[i])
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        images.append(atoms)
    write(path, images)
    return path


@pytest.mark.parametrize(
    "key,value", [("energies", np.nan), ("forces", np.inf), ("coords", -np.inf), ("forces", np.nan)]
)
def test_gaq_train_refuses_nan_or_inf_in_an_rmd17_file(tmp_path, capsys, key, value):
    from gaq_calc.cli.train import main

    path = _rmd17_file(tmp_path / "bad.npz", 7, key, value)
    what = {"energies": "energy", "forces": "forces", "coords": "positions"}[key]
    with pytest.raises(SystemExit) as err:
        main(
            [
                "--train-data",
                str(path),
                "--out-dir",
                str(tmp_path / "out"),
                "--epochs",
                "1",
                "--n-val",
                "2",
                "--batch-size",
                "4",
                "--model-num-features",
                "8",
                "--model-num-layers",
                "1",
                "--no-progress",
            ]
        )
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert re.search(rf"bad\.npz: frame 7 has a non-finite {what} label", message)
    assert message.count("\n") == 1  # one line


@pytest.mark.parametrize("what,value", [("energy", np.nan), ("forces", -np.inf)])
def test_reading_an_ase_file_refuses_nan_or_inf_labels(tmp_path, what, value):
    path = _extxyz_file(tmp_path / "bad.extxyz", 3, what, value)
    with pytest.raises(ValueError, match=rf"bad\.extxyz: frame 3 has a non-finite {what} label"):
        read_frames(path)


VACUUM_PROBE = """
import resource, sys
import numpy as np
from gaq_calc.data import read_frames
from gaq_calc.data.graphs import neighbour_graph
positions = read_frames("ethanol", "test").positions[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r, s, shifts = neighbour_graph(positions, 5.0, np.diag([2500.0, 2500.0, 2500.0]), np.ones(3, bool))
print(len(r), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_periodic_cell_with_much_vacuum_takes_little_memory():
    """A molecule in a 2500 Å periodic box: binning it into 5 Å cells took ~500 MB (4 GB at 4000 Å).
    Measured in a subprocess (peak resident memory) so the test process keeps its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", VACUUM_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_edges, extra_kb = map(int, proc.stdout.split())
    assert n_edges == 72  # ethanol within 5 Å: every pair, no periodic image
    assert extra_kb < 50_000, f"the neighbour list took {extra_kb / 1000:.0f} MB"


def test_vacuum_cells_give_the_same_graph_and_energy():
    from gaq_calc.data.graphs import _periodic_pairs, neighbour_graph

    positions = read_frames("ethanol", "test").positions[4]
    # a slab: periodic images 6 Å apart along z (matscipy bins it cheaply); the all-pairs images agree
    for cell, pbc in [
        (np.diag([3000.0, 3000.0, 6.0]), [True, True, True]),
        (np.array([[7.0, 0.0, 0.0], [2.0, 6.5, 0.0], [1.0, -1.5, 6.0]]), [True, False, True]),
    ]:
        shifted = positions + np.array([30.3, -17.1, 11.9])  # outside the cell: wrapped by whole lattice vectors
        expected = neighbour_graph(shifted, 5.0, cell, np.array(pbc))
        got = _periodic_pairs(shifted, 5.0, cell, np.array(pbc))
        key = lambda g: sorted(zip(g[0].tolist(), g[1].tolist(), np.round(g[2], 6).tolist()))
        assert len(got[0]) == len(expected[0]) > 72 and key(got) == key(expected)
    # in a huge box, periodic or not, ethanol has the same energy
    atoms = ethanol_atoms(4)
    calc = GAQCalculator("ethanol_fp32", dtype="float64")
    e0, f0 = _energy_forces(calc, atoms)
    boxed = atoms.copy()
    boxed.cell, boxed.pbc = np.diag([4000.0, 3000.0, 5000.0]), True
    e1, f1 = _energy_forces(calc, boxed)
    assert e1 == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=1e-9)


def test_many_atoms_in_a_vacuum_cell_get_a_clear_error():
    from gaq_calc.data.graphs import neighbour_graph

    positions = np.random.default_rng(0).uniform(0, 40, (600, 3))
    with pytest.raises(ValueError, match="vacuum"):
        neighbour_graph(positions, 5.0, np.diag([3000.0, 3000.0, 3000.0]), np.ones(3, bool))
