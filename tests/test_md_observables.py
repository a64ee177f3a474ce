"""NVT sampling fidelity: structural observables (gaq_calc.md.observables) and md_protocols/sampling.py."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

from gaq_calc import GAQCalculator
from gaq_calc.md import MDSettings, load_structure, run_nvt
from gaq_calc.md.observables import (
    angles_of,
    azo_dihedral_of,
    bond_angles,
    bonds_of,
    dihedral,
    observables,
    wasserstein,
)

REPO = Path(__file__).resolve().parents[1]


def test_azobenzene_topology_from_the_reference_structure():
    atoms = load_structure("azobenzene", 0)
    bonds = bonds_of(atoms)
    # C12H10N2: 12 ring C-C, 10 C-H, 2 C-N, 1 N=N
    assert len(bonds) == 25
    pairs = sorted(tuple(sorted(atoms.numbers[b])) for b in bonds)
    assert pairs.count((1, 6)) == 10 and pairs.count((6, 6)) == 12 and pairs.count((6, 7)) == 2
    assert pairs.count((7, 7)) == 1
    quad = azo_dihedral_of(atoms, bonds)
    assert list(atoms.numbers[quad]) == [6, 7, 7, 6]
    # trans-azobenzene: C-N=N-C near 180 degrees
    assert abs(dihedral(atoms.positions[None], quad)[0]) > 150
    # every angle's centre is bonded to both ends; a sp2 carbon has three neighbours -> 3 angles
    angles = angles_of(bonds)
    assert len(angles) == 12 * 3 + 2 * 1  # 12 ring carbons with 3 neighbours, 2 nitrogens with 2


def test_angle_and_dihedral_of_known_geometries():
    # right angle at the origin; dihedral of +90 degrees for a quarter turn about z
    p = np.array([[[1.0, 0, 0], [0, 0, 0], [0, 1.0, 0]]])
    np.testing.assert_allclose(bond_angles(p, np.array([[0, 1, 2]])), [[90.0]])
    quad = np.array([0, 1, 2, 3])
    for phi in (-150.0, -30.0, 60.0, 180.0):
        t = np.radians(phi)
        x = np.array([[[1.0, 0, 0], [0, 0, 0], [0, 0, 1.0], [np.cos(t), np.sin(t), 1.0]]])
        assert abs((dihedral(x, quad)[0] - phi + 180.0) % 360.0 - 180.0) < 1e-9  # equal modulo 360


def test_wasserstein_of_shifted_samples_is_the_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3))
    assert wasserstein(a, a) == 0.0
    assert wasserstein(a, a + 0.25) == pytest.approx(0.25)


def test_sampling_cli_on_short_runs(tmp_path, capsys):
    calc = GAQCalculator("ethanol_fp32")
    runs = []
    for seed in (0, 1, 2):
        atoms = load_structure("ethanol", 0)
        atoms.calc = calc
        settings = MDSettings(
            "nvt", "langevin", temperature_K=300.0, timestep_fs=0.5, n_steps=40, log_every=2, seed=seed
        )
        run_nvt(atoms, settings, tmp_path / f"run{seed}", progress=False)
        runs.append(tmp_path / f"run{seed}")
    main = runpy.run_path(str(REPO / "md_protocols" / "sampling.py"))["main"]
    out = tmp_path / "cmp" / "sampling"
    assert main([str(runs[2]), "--reference", str(runs[0]), "--noise-floor", str(runs[1]), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    floor, other = record["rows"]
    assert floor["run"] == "run1" and all(r == pytest.approx(1.0) for r in floor["ratio_to_noise_floor"].values())
    assert set(other["w1"]) == {"bond", "angle", "temperature"}  # ethanol has no azo group
    assert all(np.isfinite(v) and v > 0 for v in other["w1"].values())
    assert out.with_suffix(".png").stat().st_size > 0 and "run2" in out.with_suffix(".md").read_text()
    # the reference cannot be its own noise floor (a zero floor), rows need distinct folder names, and no run may
    # share the reference's seed (the same thermostat noise)
    (tmp_path / "other").mkdir()
    shutil.copytree(runs[2], tmp_path / "other" / "run2")
    shutil.copytree(runs[0], tmp_path / "other" / "run0b")  # a run with the reference's seed
    for bad, message in (
        ([str(runs[2]), "--noise-floor", str(runs[0])], "noise-floor must be a second reference run"),
        ([str(tmp_path / "other" / "run2"), str(runs[2]), "--noise-floor", str(runs[1])], "its own name"),
        ([str(tmp_path / "other" / "run0b"), "--noise-floor", str(runs[1])], "used the seed of --reference (0)"),
    ):
        with pytest.raises(SystemExit):
            main([*bad, "--reference", str(runs[0]), "--out", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))
    positions = np.stack([load_structure("ethanol", 0).positions] * 3)
    assert observables(positions, np.full(3, 300.0), load_structure("ethanol", 0))["bond"].shape == (3, 8)
