"""Helpers shared by the test modules (import them from here: `from helpers import ...`; pytest puts tests/
on sys.path). Fixtures stay in conftest.py."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from gaq_calc.model import GAQPotential, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    cfg = dict(species=[1, 6, 8], num_features=16, num_layers=2, num_heads=2, num_rbf=8, radial_hidden=8)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def randomize(model: GAQPotential, seed: int = 0, scale: float = 0.3) -> GAQPotential:
    """Non-trivial weights (fresh init leaves some layers at zero effect) for symmetry tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def ethanol_batch(frames, ks, dtype=torch.float64, positions=None):
    """Frames ks of an ethanol frame set as one graph batch (5 Å cutoff, species H C O); `positions` (one
    array per frame) replaces the frames' positions."""
    from gaq_calc.data import GraphDataset

    ks = list(ks)
    frames = frames.subset(ks)
    if positions is not None:
        frames.positions = [np.asarray(p) for p in positions]
    return GraphDataset(frames, [1, 6, 8], 5.0).collate(list(range(len(ks)))).to("cpu", dtype)


def call(energy_forces, b):
    """(energies, forces) of an energy-and-forces callable (EnergyForces, a kernel) on a GraphBatch."""
    return energy_forces(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, b.n_graphs)


def calibrated_qat(frames, preset_name, calibration=(0, 3, 4, 5)):
    """A tiny random ethanol model prepared for QAT with a preset, activation ranges calibrated on frames."""
    from gaq_calc.model import energy_and_forces
    from gaq_calc.quant import calibrate, prepare, preset

    torch.manual_seed(0)
    fp = randomize(GAQPotential(tiny_config()), seed=5, scale=0.2).eval()
    batches = [ethanol_batch(frames, [k], torch.float32) for k in calibration]
    return calibrate(prepare(fp, preset(preset_name)), batches, energy_and_forces).eval()


def ethanol_atoms(k=0, split="test"):
    """Frame k of the shipped ethanol split as ASE Atoms (no calculator)."""
    from ase import Atoms

    from gaq_calc.data import read_frames

    frames = read_frames("ethanol", split)
    return Atoms(numbers=frames.numbers[k], positions=frames.positions[k])


def ethanol(calc, frame=0):
    """The MD protocols' ethanol structure `frame` with `calc` attached."""
    from gaq_calc.md import load_structure

    atoms = load_structure("ethanol", frame)
    atoms.calc = calc
    return atoms


def nve(n_steps, **kw):
    """The MD tests' NVE settings: 300 K, 0.5 fs, a frame every 5 steps, seed 3."""
    from gaq_calc.md import MDSettings

    return MDSettings("nve", temperature_K=300.0, timestep_fs=0.5, n_steps=n_steps, log_every=5, seed=3, **kw)


def load_script(path: Path, name: str):
    """A script of the repository (benchmarks/, scripts/) imported as a module, without running its main."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
