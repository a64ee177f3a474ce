"""A dipole head on the equivariant transformer (issue 16, optional part): the molecular dipole vector

    mu = sum_i q_i (r_i - c) + sum_i p_i        (e·Å)

from partial charges q_i (an MLP on the invariant features h_i, shifted per molecule so that the charges
sum to zero, which makes mu independent of the origin; c is the centroid) and atomic dipoles p_i (the
l=1 features v_i mixed over channels by a bias-free Linear). Both terms rotate with the molecule, so mu
is rotation-equivariant by construction (up to float rounding). QM9 labels only |mu| (debye), so that
is what it is trained on (gaq_calc.train.dipole).

The features come from the same network as the energy model (`GAQPotential`), run up to its readout;
`equivariant_features` mirrors `GAQPotential.forward`, and a test checks that the energy computed from
its features equals the potential's.
"""

from __future__ import annotations

import torch
from ase import units
from torch import nn

from gaq_calc.model.config import ModelConfig
from gaq_calc.model.layers import scatter_sum
from gaq_calc.model.network import GAQPotential

#: e·Å per debye (ase.units.Debye).
E_ANGSTROM_PER_DEBYE: float = units.Debye


def equivariant_features(potential: GAQPotential, species, positions, receivers, senders, shifts):
    """Scalars h [n, F] and Cartesian vectors v [n, 3, F] after the last layer of `potential`."""
    n = positions.shape[0]
    F, L, H = potential.num_features, potential.num_layers, potential.num_heads
    vec = positions.index_select(0, senders) - positions.index_select(0, receivers) + shifts  # [E, 3]
    r = torch.linalg.norm(vec, dim=-1)
    sph = potential.sph(vec)
    sph4 = torch.cat([torch.zeros_like(sph[:, :1]), sph], dim=1)
    envelope = potential.envelope(r)
    radial = potential.radial(potential.rbf(r)).view(-1, L, 3 * F + H).unbind(1)
    h = potential.embedding(species)
    v = torch.zeros((n, 3, F), dtype=h.dtype, device=h.device)
    for i, layer in enumerate(potential.layers):
        filters, bias = radial[i].split([3 * F, H], dim=1)
        h, v = layer(h, v, filters, -nn.functional.softplus(bias), envelope, sph4, receivers, senders)
    return h, v


class DipoleModel(nn.Module):
    """Dipole vectors [n_graphs, 3] (e·Å) of a batch of molecules."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        F = config.num_features
        self.backbone = GAQPotential(config)  # its energy readout is unused here
        self.charge = nn.Sequential(nn.LayerNorm(F), nn.Linear(F, F), nn.SiLU(), nn.Linear(F, 1))
        self.atomic_dipole = nn.Linear(F, 1, bias=False)  # mixes l=1 channels only: equivariant

    def forward(self, species, positions, receivers, senders, shifts, batch, n_graphs: int) -> torch.Tensor:
        h, v = equivariant_features(self.backbone, species, positions, receivers, senders, shifts)
        ones = torch.ones_like(positions[:, 0])
        n_atoms = scatter_sum(ones, batch, n_graphs)  # [G]
        q = self.charge(h).squeeze(-1)  # [n]
        q = q - (scatter_sum(q, batch, n_graphs) / n_atoms).index_select(0, batch)  # neutral molecules
        centre = scatter_sum(positions, batch, n_graphs) / n_atoms[:, None]  # [G, 3]
        local = q[:, None] * (positions - centre.index_select(0, batch)) + self.atomic_dipole(v).squeeze(-1)
        return scatter_sum(local, batch, n_graphs)  # [G, 3]

    def dipole_debye(self, batch) -> torch.Tensor:
        """|mu| in debye [n_graphs] of a GraphBatch."""
        mu = self(
            batch.species, batch.positions, batch.receivers, batch.senders, batch.shifts, batch.batch, batch.n_graphs
        )
        return torch.linalg.norm(mu, dim=-1) / E_ANGSTROM_PER_DEBYE
