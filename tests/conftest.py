"""Shared fixtures: tiny models so the default run stays fast on 2 cores."""
import numpy as np
import pytest
import torch

from gaq_calc.data import read_frames
from gaq_calc.model import GAQPotential, ModelConfig
from gaq_calc.model.serialization import save_model


def tiny_config(**overrides) -> ModelConfig:
    cfg = dict(species=[1, 6, 8], num_features=16, num_layers=2, num_heads=2, num_rbf=8, radial_hidden=8)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def ethanol_batch(frames, ks, dtype=torch.float64):
    """Frames ks of an ethanol frame set as one graph batch (5 A cutoff, species H C O)."""
    from gaq_calc.data import GraphDataset

    ks = list(ks)
    return GraphDataset(frames.subset(ks), [1, 6, 8], 5.0).collate(list(range(len(ks)))).to("cpu", dtype)


def calibrated_qat(frames, preset_name, calibration=(0, 3, 4, 5)):
    """A tiny random ethanol model prepared for QAT with a preset, activation ranges calibrated on frames."""
    from gaq_calc.model import energy_and_forces
    from gaq_calc.quant import calibrate, prepare, preset

    torch.manual_seed(0)
    fp = randomize(GAQPotential(tiny_config()), seed=5, scale=0.2).eval()
    batches = [ethanol_batch(frames, [k], torch.float32) for k in calibration]
    return calibrate(prepare(fp, preset(preset_name)), batches, energy_and_forces).eval()


def randomize(model: GAQPotential, seed: int = 0, scale: float = 0.3) -> GAQPotential:
    """Non-trivial weights (fresh init leaves some layers at zero effect) for symmetry tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


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
