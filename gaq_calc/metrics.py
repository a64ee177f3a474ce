"""Error metrics shared by the trainer, gaq-eval and the tests."""

from __future__ import annotations

import numpy as np
import torch

from gaq_calc.data.graphs import GraphDataset
from gaq_calc.model.network import energy, energy_and_forces
from gaq_calc.units import MEV_PER_EV


def predict(model, dataset: GraphDataset, batch_size: int = 32, with_forces: bool | None = None):
    """Energies [n_frames] (eV, float64) and per-frame forces (eV/Å) for every frame, in order.

    with_forces=None: forces where the data have force labels; without them (energy-only data) the
    forces are not computed and None is returned in their place.
    """
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if with_forces is None:
        with_forces = dataset.frames.has_forces
    energies, forces = [], []
    for batch in dataset.batches(batch_size):
        batch = batch.to(device, dtype)
        if not with_forces:
            with torch.no_grad():
                e = energy(model, batch)
            energies.append(e.detach().cpu().numpy())
            continue
        e, f = energy_and_forces(model, batch)
        energies.append(e.detach().cpu().numpy())
        f = f.detach().cpu().double().numpy()
        forces.extend(np.split(f, np.cumsum(batch.n_atoms_per_graph.cpu().numpy())[:-1]))
    return np.concatenate(energies), (forces if with_forces else None)


def error_metrics(model, dataset: GraphDataset, batch_size: int = 32) -> dict:
    """MAE/RMSE of energies (meV) and of force components (meV/Å) over all frames and components.

    Energy-only data (no force labels, e.g. QM9) give the energy metrics alone: no force keys.
    """
    energies, forces = predict(model, dataset, batch_size)
    frames = dataset.frames
    de = energies - frames.energies
    n_atoms = np.array([len(n) for n in frames.numbers])
    metrics = {
        "n_frames": len(frames),
        "energy_mae_meV": float(np.mean(np.abs(de)) * MEV_PER_EV),
        "energy_rmse_meV": float(np.sqrt(np.mean(de**2)) * MEV_PER_EV),
        "energy_per_atom_mae_meV": float(np.mean(np.abs(de) / n_atoms) * MEV_PER_EV),
    }
    if forces is not None:
        df = np.concatenate([p - t for p, t in zip(forces, frames.forces)])
        metrics["force_mae_meV_per_A"] = float(np.mean(np.abs(df)) * MEV_PER_EV)
        metrics["force_rmse_meV_per_A"] = float(np.sqrt(np.mean(df**2)) * MEV_PER_EV)
    return metrics


def force_rms(dataset_forces: list[np.ndarray]) -> float:
    return float(np.sqrt(np.mean(np.concatenate([f.ravel() for f in dataset_forces]) ** 2)))


def residual_energy_scale(frames, reference_energies, species: list[int]) -> float:
    """Energy scale of energy-only data: RMS over frames of (E - sum_i E_ref[Z_i]) / sqrt(n_atoms),
    the per-atom spread of the energy left after the reference fit (eV), if atoms contributed
    independently. Plays the role of the force RMS as the network's output scale."""
    from gaq_calc.data.reference import composition_matrix

    residual = frames.energies - composition_matrix(frames, species) @ np.asarray(reference_energies)
    n_atoms = np.array([len(n) for n in frames.numbers], dtype=np.float64)
    return float(np.sqrt(np.mean(residual**2 / n_atoms)))


def random_rotations(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """n uniformly random proper rotations [n, 3, 3] (QR of Gaussian matrices, sign-fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.det(q) < 0, :, 0] *= -1  # reflections -> rotations
    return q.to(dtype)


def rotated(batch, rotation: torch.Tensor):
    """The same batch with positions and cell shifts rotated: x -> x R^T."""
    from dataclasses import replace

    r = rotation.to(batch.positions.dtype)
    return replace(batch, positions=batch.positions @ r.T, shifts=batch.shifts @ r.T)


def local_equivariance_error(
    model, dataset: GraphDataset, n_rotations: int = 4, seed: int = 0, batch_size: int = 32
) -> dict:
    """LEE in meV/Å: mean over frames, rotations R and atoms of |F_i(R x) - R F_i(x)|."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    rotations = random_rotations(n_rotations, seed)
    errors = []
    for batch in dataset.batches(batch_size):
        batch = batch.to(device, dtype)
        _, forces = energy_and_forces(model, batch)
        for rot in rotations:
            _, forces_rot = energy_and_forces(model, rotated(batch, rot.to(device)))
            diff = forces_rot.detach().double() - forces.detach().double() @ rot.to(device).T
            errors.append(torch.linalg.norm(diff, dim=-1).cpu())
    return {
        "lee_meV_per_A": float(torch.cat(errors).mean()) * MEV_PER_EV,
        "lee_rotations": n_rotations,
        "lee_frames": len(dataset),
    }
