"""Shared fixtures: tiny models so the default run stays fast on 2 cores. Shared helpers live in helpers.py."""

import numpy as np
import pytest
import torch
from helpers import calibrated_qat, ethanol_batch, randomize, tiny_config  # noqa: F401  (also importable here)

from gaq_calc.data import read_frames
from gaq_calc.model import GAQPotential
from gaq_calc.model.serialization import save_model


@pytest.fixture(scope="session")
def ethanol_frames():
    return read_frames("ethanol", "train").subset(np.arange(0, 1000, 50))


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory, ethanol_frames):
    """A tiny untrained ethanol model with fitted reference energies, saved as a model file."""
    from gaq_calc.data import fit_reference_energies

    torch.manual_seed(0)
    model = randomize(GAQPotential(tiny_config()), seed=1, scale=0.1)
    model.set_energy_reference(fit_reference_energies(ethanol_frames, [1, 6, 8]), 0.5)
    path = tmp_path_factory.mktemp("models") / "tiny" / "model.pt"
    save_model(path, model.eval(), {"train_data": "ethanol"})
    return path


@pytest.fixture(scope="module")
def tiny_calc(tiny_model_file):
    """The tiny model's calculator in float64 (MD tests)."""
    from gaq_calc import GAQCalculator

    return GAQCalculator(tiny_model_file, dtype="float64")
