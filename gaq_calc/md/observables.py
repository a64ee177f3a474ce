"""Structural observables of a trajectory and distances between their distributions (NVT sampling fidelity).

Bonds come from the reference structure (ASE's natural cutoffs), so every run of the same molecule is
measured on the same bonds, angles and dihedrals whatever it did later. Distances between two runs are
Wasserstein-1 (earth mover's) distances of the pooled samples of an observable kind, in its own units
(Å, degrees, K): for a kind with several members (all bonds, all angles) the distance is the mean over
members of each member's distance.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import natural_cutoffs, neighbor_list
from scipy.stats import wasserstein_distance


def bonds_of(atoms: Atoms, mult: float = 1.2) -> np.ndarray:
    """[n_bonds, 2] atom pairs i < j closer than `mult` x the sum of their covalent radii (1.2: the usual
    tolerance; at 1.0 a C-H bond of 1.09 Å is longer than 0.76 + 0.31 Å and would be missed)."""
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=mult))
    keep = i < j
    return np.stack([i[keep], j[keep]], axis=1)


def angles_of(bonds: np.ndarray) -> np.ndarray:
    """[n_angles, 3] bonded triples (a, centre, b), a < b."""
    neighbours: dict[int, list[int]] = {}
    for i, j in bonds:
        neighbours.setdefault(int(i), []).append(int(j))
        neighbours.setdefault(int(j), []).append(int(i))
    triples = [(a, c, b) for c, ns in neighbours.items() for a in ns for b in ns if a < b]
    return np.array(sorted(triples), dtype=np.int64).reshape(-1, 3)


def azo_dihedral_of(atoms: Atoms, bonds: np.ndarray) -> np.ndarray | None:
    """The C-N=N-C quadruple of an azo group (N bonded to N, each N bonded to one C), or None."""
    numbers = atoms.numbers
    for i, j in bonds:
        if numbers[i] == numbers[j] == 7:
            ci = [int(b if a == i else a) for a, b in bonds if i in (a, b) and numbers[b if a == i else a] == 6]
            cj = [int(b if a == j else a) for a, b in bonds if j in (a, b) and numbers[b if a == j else a] == 6]
            if len(ci) == 1 and len(cj) == 1:
                return np.array([ci[0], int(i), int(j), cj[0]])
    return None


def bond_lengths(positions: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """[n_frames, n_bonds] in Å; positions [n_frames, n_atoms, 3]."""
    return np.linalg.norm(positions[:, bonds[:, 1]] - positions[:, bonds[:, 0]], axis=-1)


def bond_angles(positions: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """[n_frames, n_angles] in degrees."""
    u = positions[:, angles[:, 0]] - positions[:, angles[:, 1]]  # [n_frames, n_angles, 3]
    w = positions[:, angles[:, 2]] - positions[:, angles[:, 1]]
    cos = (u * w).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(w, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def dihedral(positions: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """[n_frames] signed dihedral angle in degrees, in (-180, 180]."""
    p0, p1, p2, p3 = (positions[:, k] for k in quad)
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    x = (v * w).sum(-1)
    y = (np.cross(b1n, v) * w).sum(-1)
    return np.degrees(np.arctan2(y, x))


def observables(positions: np.ndarray, temperature: np.ndarray, reference: Atoms) -> dict[str, np.ndarray]:
    """Samples per observable kind: "bond" [n_frames, n_bonds] (Å), "angle" [n_frames, n_angles] (deg),
    "CNNC dihedral" [n_frames, 1] (|angle|, deg; trans is 180), "temperature" [n_frames, 1] (K)."""
    bonds = bonds_of(reference)
    out = {"bond": bond_lengths(positions, bonds), "angle": bond_angles(positions, angles_of(bonds))}
    quad = azo_dihedral_of(reference, bonds)
    if quad is not None:
        # |phi|: trans-azobenzene flips between +-180 continuously; the magnitude is the physical angle
        out["CNNC dihedral"] = np.abs(dihedral(positions, quad))[:, None]
    out["temperature"] = np.asarray(temperature, dtype=np.float64)[:, None]
    return out


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over members (columns) of the Wasserstein-1 distance of their samples."""
    return float(np.mean([wasserstein_distance(a[:, k], b[:, k]) for k in range(a.shape[1])]))
