"""Many structures in one model call: `GAQCalculator.energies_and_forces(list_of_atoms)`.

The network and both kernels take a batch of disjoint graphs (species, positions, receivers, senders,
shifts, batch, n_graphs), as in training. This module builds that batch from ASE Atoms with the
calculator's own per-structure checks (elements, finite positions, overlaps, cells), makes one kernel
call for the whole list, and splits the result per structure. Replicas (path-integral beads, parallel
tempering, committee or ensemble runs) then cost one call, not one per structure.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gaq_calc.data.graphs import GraphBatch


def batch_graph(calc, structures: Sequence) -> tuple[GraphBatch | None, list[int]]:
    """(one GraphBatch of every non-empty structure, or None if there is none; their indices).

    Each structure is checked and given its neighbour list exactly as in a single call (calc._graph);
    a bad one raises ValueError naming its index."""
    graphs, kept = [], []
    for k, atoms in enumerate(structures):
        if len(atoms) == 0:
            continue
        try:
            graphs.append(calc._graph(atoms))
        except ValueError as err:
            raise ValueError(f"structure {k}: {err}") from None
        kept.append(k)
    if not graphs:
        return None, kept
    n_atoms = [len(g.species) for g in graphs]
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).tolist()
    device = graphs[0].positions.device
    return GraphBatch(
        species=torch.cat([g.species for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        receivers=torch.cat([g.receivers + o for g, o in zip(graphs, offsets)]),
        senders=torch.cat([g.senders + o for g, o in zip(graphs, offsets)]),
        shifts=torch.cat([g.shifts for g in graphs]),
        batch=torch.repeat_interleave(torch.arange(len(graphs), device=device), torch.tensor(n_atoms, device=device)),
        n_graphs=len(graphs),
        n_atoms_per_graph=torch.tensor(n_atoms, device=device),
    ), kept


def energies_and_forces(calc, structures: Sequence) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV, float64 [n]) and forces (list of float64 [n_atoms_k, 3], eV/Å) of every structure,
    from one call of calc's kernel on the whole batch. Structures may differ in size and composition;
    an empty one has energy 0. calc's own ASE state (atoms, results) is neither used nor changed."""
    structures = list(structures)
    energies = np.zeros(len(structures))
    forces = [np.zeros((len(atoms), 3)) for atoms in structures]
    g, kept = batch_graph(calc, structures)
    if g is None:
        return energies, forces
    # forces need autograd even under a caller's no_grad/inference_mode; both are restored on exit
    with torch.inference_mode(False), torch.enable_grad():
        e, f = calc.energy_forces(g.species, g.positions, g.receivers, g.senders, g.shifts, g.batch, g.n_graphs)
    e = e.detach().cpu().double().numpy()
    f = f.detach().cpu().double().numpy()
    start = 0
    for i, k in enumerate(kept):
        n = len(structures[k])
        energies[k], forces[k] = e[i], f[start : start + n]
        start += n
        if not (np.isfinite(energies[k]) and np.isfinite(forces[k]).all()):
            raise FloatingPointError(f"the model returned a non-finite energy or forces for structure {k}")
    return energies, forces
