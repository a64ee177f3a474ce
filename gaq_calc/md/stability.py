"""Blow-up detection: non-finite numbers, runaway temperature, broken or stretched bonds.

A learned potential can run for a while and then fall apart (an atom leaves, a bond dissociates, the
temperature runs away); the energy of such a trajectory can even look conserved. Following Fu et al.,
"Forces are not enough" (TMLR 2023), a bond is broken when its length deviates from its reference by
more than 0.5 Å. Bonds are the pairs of the starting structure closer than 1.2 x the sum of their
covalent radii (ASE's natural_cutoffs with mult=1.2: thermal structures such as rMD17 frames stretch
C-H and C-C bonds beyond the bare sum), and the reference lengths are those of the starting structure.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import natural_cutoffs, neighbor_list


class BlowUp(RuntimeError):
    """The trajectory became unphysical; str(err) says why (and at which step)."""


class StabilityMonitor:
    """Cheap vectorized checks, run at every logged step.

    max_temperature_K: stop above this temperature (K).
    bond_tolerance: stop when any bond deviates from its reference length by more than this (Å).
    bond_mult: bonds are pairs closer than bond_mult x the sum of covalent radii in `reference`.
    """

    def __init__(self, reference: Atoms, max_temperature_K: float, bond_tolerance: float = 0.5, bond_mult: float = 1.2):
        self.max_temperature_K = float(max_temperature_K)
        self.bond_tolerance = float(bond_tolerance)
        i, j, shift = neighbor_list("ijS", reference, natural_cutoffs(reference, mult=bond_mult))
        keep = i < j  # each bond once
        self.i, self.j = i[keep], j[keep]  # [n_bonds]
        # periodic images through fixed integer shifts: ASE integrators do not wrap positions
        self.offset = shift[keep] @ np.asarray(reference.cell.array)  # [n_bonds, 3] Å
        self.reference_lengths = self.lengths(reference.positions)  # [n_bonds] Å

    @property
    def n_bonds(self) -> int:
        return len(self.i)

    def lengths(self, positions: np.ndarray) -> np.ndarray:
        d = positions[self.j] - positions[self.i] + self.offset  # [n_bonds, 3]
        return np.sqrt(np.einsum("bk,bk->b", d, d))

    def check(self, step: int, positions, velocities, energies, temperature: float) -> None:
        """Raise BlowUp with the reason, or return None when the frame looks physical."""
        for name, value in (("positions", positions), ("velocities", velocities), ("energies", energies)):
            if not np.isfinite(value).all():
                raise BlowUp(f"non-finite {name} at step {step}")
        if temperature > self.max_temperature_K:
            raise BlowUp(f"temperature {temperature:.0f} K above {self.max_temperature_K:.0f} K at step {step}")
        if self.n_bonds:
            dev = np.abs(self.lengths(positions) - self.reference_lengths)
            k = int(np.argmax(dev))
            if dev[k] > self.bond_tolerance:
                raise BlowUp(
                    f"bond {self.i[k]}-{self.j[k]} deviates {dev[k]:.2f} Å from its reference length "
                    f"{self.reference_lengths[k]:.2f} Å (tolerance {self.bond_tolerance} Å) at step {step}"
                )
