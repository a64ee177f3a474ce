"""Neighbour graphs (matscipy) and batching of many structures into one disjoint graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from matscipy.neighbours import neighbour_list

from gaq_calc.data.frames import Frames

#: below this many atoms (and without a cell) all pairs are checked directly
BRUTE_FORCE_MAX_ATOMS = 512
#: largest number of cutoff-sized bins matscipy is asked to allocate for an isolated structure
MAX_BINS = 50_000_000


def neighbour_graph(
    positions: np.ndarray,
    cutoff: float,
    cell: Optional[np.ndarray] = None,
    pbc: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed edges j -> i with |r_j - r_i + shift| < cutoff.

    Returns (receivers [E], senders [E], shifts [E, 3]); shifts are Cartesian cell offsets (Å), so the
    edge vector is positions[senders] - positions[receivers] + shifts.
    """
    n = len(positions)
    if pbc is not None and np.any(pbc):
        cell = np.asarray(cell, dtype=np.float64)
        bins = _cell_bins(cell, cutoff)
        if not bins > MAX_BINS:  # (a degenerate cell, NaN here, goes to matscipy's own error)
            i, j, s = neighbour_list("ijS", positions=positions, cutoff=cutoff, cell=cell, pbc=pbc)
            shifts = s.astype(np.float64) @ cell
        elif n <= BRUTE_FORCE_MAX_ATOMS:  # a small structure in a cell of mostly vacuum: all pairs, few images
            i, j, shifts = _periodic_pairs(positions, cutoff, cell, np.asarray(pbc, dtype=bool))
        else:
            raise ValueError(
                f"a periodic cell of {np.linalg.norm(cell, axis=1).round(1).tolist()} Å with {n} atoms is mostly "
                f"vacuum: its neighbour list would need {bins:.2g} cutoff-sized bins; use a smaller cell, or "
                "pbc=False for an isolated structure"
            )
    elif n <= BRUTE_FORCE_MAX_ATOMS:
        # small molecules: all pairs is cheaper than binning, and safe for any spread of coordinates
        d2 = ((positions[:, None, :] - positions[None, :, :]) ** 2).sum(-1)  # [n, n]
        np.fill_diagonal(d2, np.inf)
        i, j = np.nonzero(d2 < cutoff * cutoff)
        shifts = np.zeros((len(i), 3))
    else:
        shifted = positions - positions.min(axis=0)
        extent = shifted.max(axis=0) + cutoff + 1.0
        if np.prod(np.ceil(extent / cutoff)) > MAX_BINS:
            raise ValueError(
                f"structure spans {shifted.max(axis=0).round(1).tolist()} Å, too sparse for a neighbour list "
                "(have atoms flown apart?)"
            )
        # explicit padded box: matscipy's own bounding box is singular for planar or linear molecules
        box = np.diag(extent)
        i, j = neighbour_list("ij", positions=shifted, cutoff=cutoff, cell=box, pbc=np.zeros(3, bool))
        shifts = np.zeros((len(i), 3))
    return i.astype(np.int64), j.astype(np.int64), shifts


def centred(positions: np.ndarray) -> np.ndarray:
    """Positions relative to their mean, formed in float64 before any cast to the network's dtype.

    Absolute coordinates far from the origin (a molecule at 1e6 Å) keep few float32 digits, and the
    edge vectors formed from them would lose the rest; energies and forces do not change under a rigid
    shift, so the network sees each structure about its own centre."""
    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) == 0:
        return positions.copy()
    return positions - positions.mean(axis=0)


def wrap_positions(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Positions moved by whole lattice vectors into the cell along periodic directions (float64).

    Energies and forces of a periodic structure do not change, and the neighbour list's shifts stay a few
    cell vectors long instead of growing with the distance from the origin."""
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    fractional = np.linalg.solve(cell.T, positions.T).T  # positions = fractional @ cell
    whole = np.where(pbc, np.floor(fractional), 0.0)
    return positions - whole @ cell


def _cell_heights(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (Å), one per cell vector."""
    volume = abs(np.linalg.det(cell))
    cross = [np.cross(cell[1], cell[2]), np.cross(cell[2], cell[0]), np.cross(cell[0], cell[1])]
    return volume / np.linalg.norm(cross, axis=1)


def _cell_bins(cell: np.ndarray, cutoff: float) -> float:
    """About how many cutoff-sized bins matscipy allocates for this cell (~4 bytes each, measured)."""
    return float(np.prod(np.maximum(1.0, np.floor(_cell_heights(cell) / cutoff))))


def _periodic_pairs(positions: np.ndarray, cutoff: float, cell: np.ndarray, pbc: np.ndarray):
    """neighbour_graph for a few atoms in a periodic cell, by all pairs over the periodic images that can
    lie within the cutoff: memory n^2 per image, whatever the size of the cell."""
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    fractional = np.linalg.solve(cell.T, positions.T).T
    whole = np.where(pbc, np.floor(fractional), 0.0)  # [n, 3] lattice vectors that wrap each atom
    wrapped = positions - whole @ cell
    # |r_j - r_i + S cell| < cutoff needs |(f_j - f_i + S)_d| < cutoff / height_d, with |f_j - f_i|_d < 1
    reach = np.where(pbc, np.ceil(cutoff / _cell_heights(cell)), 0).astype(np.int64)
    ranges = [np.arange(-r, r + 1) for r in reach]
    images = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)  # [M, 3]
    if len(images) * n * n > 200_000_000:
        raise ValueError(
            f"a periodic cell with heights {_cell_heights(cell).round(2).tolist()} Å is too thin for "
            f"a {cutoff} Å cutoff with {n} atoms ({len(images)} periodic images)"
        )
    delta = wrapped[None, :, :] - wrapped[:, None, :]  # [i, j] r_j - r_i
    found = []
    for image in images:
        d2 = ((delta + image @ cell) ** 2).sum(-1)
        if not image.any():
            np.fill_diagonal(d2, np.inf)
        i, j = np.nonzero(d2 < cutoff * cutoff)
        found.append((i, j, np.broadcast_to(image, (len(i), 3))))
    i = np.concatenate([f[0] for f in found])
    j = np.concatenate([f[1] for f in found])
    image = np.concatenate([f[2] for f in found]).astype(np.float64)
    order = np.argsort(i, kind="stable")  # grouped by receiver, as matscipy returns them
    i, j, image = i[order], j[order], image[order]
    shifts = (image - whole[j] + whole[i]) @ cell  # for the positions as given, not the wrapped ones
    return i, j, shifts


@dataclass
class GraphBatch:
    """Several structures as one graph. Energies/forces are labels (absent at inference)."""

    species: torch.Tensor  # [n_atoms] index into the model's species list
    positions: torch.Tensor  # [n_atoms, 3]
    receivers: torch.Tensor  # [n_edges]
    senders: torch.Tensor  # [n_edges]
    shifts: torch.Tensor  # [n_edges, 3]
    batch: torch.Tensor  # [n_atoms] structure index of each atom
    n_graphs: int
    n_atoms_per_graph: torch.Tensor  # [n_graphs]
    energy: Optional[torch.Tensor] = None  # [n_graphs] float64
    forces: Optional[torch.Tensor] = None  # [n_atoms, 3]

    def to(self, device, dtype) -> GraphBatch:
        def cast(x, float_dtype):
            return None if x is None else x.to(device=device, dtype=float_dtype)

        return GraphBatch(
            species=self.species.to(device),
            positions=cast(self.positions, dtype),
            receivers=self.receivers.to(device),
            senders=self.senders.to(device),
            shifts=cast(self.shifts, dtype),
            batch=self.batch.to(device),
            n_graphs=self.n_graphs,
            n_atoms_per_graph=self.n_atoms_per_graph.to(device),
            energy=cast(self.energy, torch.float64),
            forces=cast(self.forces, dtype),
        )


def species_index(numbers: np.ndarray, species: list[int]) -> np.ndarray:
    """Map atomic numbers to indices into `species`; unknown elements raise a clear error."""
    lookup = np.full(119, -1, dtype=np.int64)
    lookup[np.asarray(species, dtype=np.int64)] = np.arange(len(species))
    numbers = np.asarray(numbers, dtype=np.int64)
    bad = (numbers < 0) | (numbers > 118)
    index = np.where(bad, -1, lookup[np.clip(numbers, 0, 118)])
    if np.any(index < 0):
        unknown = sorted({int(z) for z in numbers[index < 0]})
        from ase.data import chemical_symbols

        names = [chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in unknown]
        known = [chemical_symbols[z] for z in species]
        raise ValueError(f"elements {names} are not known to this model (trained on {known})")
    return index


class GraphDataset:
    """Frames with precomputed neighbour lists, batched on demand."""

    def __init__(self, frames: Frames, species: list[int], cutoff: float):
        self.frames = frames
        self.species_idx = [species_index(n, species) for n in frames.numbers]
        # compact: int32 indices and no all-zero shift arrays (QM9's 10^5 molecules would need ~1.3 GB)
        self.edges = [_compact(*neighbour_graph(p, cutoff)) for p in frames.positions]

    def __len__(self) -> int:
        return len(self.frames)

    def collate(self, index) -> GraphBatch:
        f = self.frames
        n_atoms = np.array([len(f.numbers[k]) for k in index])
        offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
        receivers = np.concatenate([self.edges[k][0].astype(np.int64) + o for k, o in zip(index, offsets)])
        senders = np.concatenate([self.edges[k][1].astype(np.int64) + o for k, o in zip(index, offsets)])
        shifts = np.concatenate([_shifts(self.edges[k]) for k in index])
        return GraphBatch(
            species=torch.from_numpy(np.concatenate([self.species_idx[k] for k in index])),
            # each structure about its own centre, in float64 (see `centred`)
            positions=torch.from_numpy(np.concatenate([centred(f.positions[k]) for k in index])),
            receivers=torch.from_numpy(receivers),
            senders=torch.from_numpy(senders),
            shifts=torch.from_numpy(shifts),
            batch=torch.from_numpy(np.repeat(np.arange(len(index)), n_atoms)),
            n_graphs=len(index),
            n_atoms_per_graph=torch.from_numpy(n_atoms),
            energy=torch.from_numpy(f.energies[np.asarray(index)]),
            forces=None if f.forces is None else torch.from_numpy(np.concatenate([f.forces[k] for k in index])),
        )

    def batches(self, batch_size: int, shuffle_seed: Optional[int] = None, first: int = 0) -> Iterator[GraphBatch]:
        """Batches in order, or shuffled by a seed (same seed, same order: resumable); `first` skips
        that many batches without building them (resuming inside an epoch)."""
        order = np.arange(len(self))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(self))
        for start in range(first * batch_size, len(order), batch_size):
            yield self.collate(order[start : start + batch_size])


def _compact(receivers, senders, shifts):
    small = len(receivers) == 0 or max(receivers.max(), senders.max()) < 2**31
    index_dtype = np.int32 if small else np.int64
    return (
        receivers.astype(index_dtype),
        senders.astype(index_dtype),
        shifts if np.any(shifts) else len(receivers),
    )  # an int: that many zero shifts


def _shifts(edges) -> np.ndarray:
    shifts = edges[2]
    return np.zeros((shifts, 3)) if isinstance(shifts, int) else shifts
