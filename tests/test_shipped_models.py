"""Shipped models: each card was written by gaq-eval for exactly this model file, and its numbers hold."""

import hashlib
import json

import numpy as np
import pytest
import torch

from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.loading import load_model
from gaq_calc.metrics import error_metrics
from gaq_calc.models_dir import available_models, models_dir

SHIPPED = ["azobenzene_fp32", "ethanol_fp32", "azobenzene_w4a8", "azobenzene_w8a8"]
ARTIFACTS = ["azobenzene_fp32", "azobenzene_w8a8", "azobenzene_w4a8"]


def test_expected_models_are_shipped():
    assert set(SHIPPED) <= set(available_models())


@pytest.mark.parametrize("name", SHIPPED)
def test_card_belongs_to_model_file(name):
    folder = models_dir() / name
    card = json.loads((folder / "card.json").read_text())
    assert card["model_sha256"] == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    assert card["n_frames"] == 1000 and card["split"] == "test"
    assert card["eval_command"].startswith("gaq-eval")
    assert card["training"]["commands"] and card["training"]["commands"][0].startswith("gaq-train")


@pytest.mark.parametrize("name", SHIPPED)
def test_card_metrics_reproduce_on_a_test_subset(name):
    """Re-evaluate 100 test frames: the card's MAEs (over 1,000 frames) must be of the same size."""
    card = json.loads((models_dir() / name / "card.json").read_text())
    model, meta = load_model(models_dir() / name / "model.pt")
    frames = read_frames(meta["train_data"], "test").subset(np.arange(0, 1000, 10))
    metrics = error_metrics(model, GraphDataset(frames, [int(z) for z in model.atomic_numbers], model.cutoff))
    assert metrics["force_mae_meV_per_A"] == pytest.approx(card["force_mae_meV_per_A"], rel=0.25)
    assert metrics["energy_mae_meV"] == pytest.approx(card["energy_mae_meV"], rel=0.5)


@pytest.mark.slow
def test_shipped_azobenzene_is_equivariant_in_float64():
    from scipy.spatial.transform import Rotation

    from gaq_calc.model import energy_and_forces

    model, _ = load_model(models_dir() / "azobenzene_fp32" / "model.pt", dtype=torch.float64)
    frames = read_frames("azobenzene", "test").subset([0])
    rng = np.random.default_rng(0)

    def ef(pos):
        f = frames.subset([0])
        f.positions = [pos]
        b = GraphDataset(f, [int(z) for z in model.atomic_numbers], 5.0).collate([0]).to("cpu", torch.float64)
        e, forces = energy_and_forces(model, b)
        return e.item(), forces.detach().numpy()

    e0, f0 = ef(frames.positions[0])
    for _ in range(10):
        R = Rotation.random(random_state=rng).as_matrix()
        e1, f1 = ef(frames.positions[0] @ R.T)
        assert abs(e1 - e0) < 1e-9
        np.testing.assert_allclose(f1, f0 @ R.T, atol=1e-10)


@pytest.mark.parametrize("name", ARTIFACTS)
def test_shipped_artifact_is_its_checkpoint(name):
    """models/NAME.pt was exported from models/NAME/model.pt and computes the same energies."""
    from ase import Atoms

    from gaq_calc import GAQCalculator
    from gaq_calc.export import load_artifact

    checkpoint = models_dir() / name / "model.pt"
    _, meta = load_artifact(models_dir() / f"{name}.pt")
    assert meta["source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    card = json.loads((models_dir() / name / "card.json").read_text())
    assert meta["card"]["force_mae_meV_per_A"] == card["force_mae_meV_per_A"]
    frames = read_frames("azobenzene", "test")
    modes = ["quantized", "conservative"] if meta["quantization"] else ["conservative"]
    for mode in modes:
        # the reference kernel on both sides: export must not change the function (the fused kernel is
        # compared with the reference path in test_kernels.py)
        art = GAQCalculator(f"{name}.pt", mode=mode, kernel="reference")
        ckpt = GAQCalculator(name, mode=mode, kernel="reference")
        for k in (0, 500):
            atoms = Atoms(numbers=frames.numbers[k], positions=frames.positions[k])
            assert abs(art.get_potential_energy(atoms) - ckpt.get_potential_energy(atoms)) < 1e-4
            np.testing.assert_allclose(art.get_forces(atoms), ckpt.get_forces(atoms), atol=1e-4)


def test_shipped_w4a8_is_equivariant_in_float64_with_every_activation_rounded():
    from scipy.spatial.transform import Rotation

    from gaq_calc.model import energy_and_forces
    from gaq_calc.quant import QuantLinear

    model, _ = load_model(models_dir() / "azobenzene_w4a8" / "model.pt", dtype=torch.float64)
    assert all(m.act_quantizer.enabled for m in model.modules() if isinstance(m, QuantLinear))
    frames = read_frames("azobenzene", "test").subset([7])
    species = [int(z) for z in model.atomic_numbers]

    def ef(pos):
        f = frames.subset([0])
        f.positions = [pos]
        b = GraphDataset(f, species, 5.0).collate([0]).to("cpu", torch.float64)
        e, forces = energy_and_forces(model, b)
        return e.item(), forces.detach().numpy()

    e0, f0 = ef(frames.positions[0])
    rng = np.random.default_rng(1)
    for _ in range(3):
        R = Rotation.random(random_state=rng).as_matrix()
        e1, f1 = ef(frames.positions[0] @ R.T)
        assert abs(e1 - e0) < 1e-9
        np.testing.assert_allclose(f1, f0 @ R.T, atol=1e-9)
