"""The equivariant transformer potential: structure -> total energy (float64); forces by autograd."""

from typing import Tuple

import torch
from e3nn import o3
from torch import nn

from gaq_calc.model.config import ModelConfig
from gaq_calc.model.layers import EquivariantAttentionLayer, scatter_sum
from gaq_calc.model.radial import BesselBasis, PolynomialEnvelope


class GAQPotential(nn.Module):
    """E = sum_i [scale * e_i(h_i) + E_ref(Z_i)], with E_ref and the sum in float64."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        F, L, H = config.num_features, config.num_layers, config.num_heads
        self.cutoff = float(config.cutoff)
        self.num_layers = L
        self.num_features = F
        self.num_heads = H
        self.embedding = nn.Embedding(len(config.species), F)
        self.rbf = BesselBasis(config.cutoff, config.num_rbf)
        self.envelope = PolynomialEnvelope(config.cutoff, config.envelope_exponent)
        self.sph = o3.SphericalHarmonics("1x1o", normalize=True, normalization="component")  # (x, y, z)
        out = L * (3 * F + H)  # per layer: three channel filters and one attention bias per head
        if config.radial_hidden > 0:
            self.radial = nn.Sequential(
                nn.Linear(config.num_rbf, config.radial_hidden),
                nn.SiLU(),
                nn.Linear(config.radial_hidden, out, bias=False),
            )
        else:
            self.radial = nn.Sequential(nn.Linear(config.num_rbf, out, bias=False))
        self.layers = nn.ModuleList([EquivariantAttentionLayer(F, H, config.tau_init) for _ in range(L)])
        self.readout = nn.Sequential(nn.LayerNorm(F), nn.Linear(F, F), nn.SiLU(), nn.Linear(F, 1))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("reference_energies", torch.zeros(len(config.species), dtype=torch.float64))
        self.register_buffer("atomic_numbers", torch.tensor(config.species, dtype=torch.long))
        # inference mode (gaq_calc.quant.set_mode): a quantized model also holds the conservative mode's
        # reference energies (conservative_reference_energies) and uses them while this is True
        self.conservative = False

    def _apply(self, fn, recurse=True):
        # reference energies (and the per-mode ones of quantized models) stay float64 whatever dtype
        # the network is cast to
        refs = {name: buf for name, buf in self._buffers.items() if name.endswith("reference_energies")}
        super()._apply(fn, recurse)
        for name, buf in refs.items():
            setattr(self, name, buf.to(device=self.energy_scale.device, dtype=torch.float64))
        return self

    def upgrade_state(self, state: dict, prefix: str) -> None:
        """Model files and artifacts written before issue 14 held a live copy of one mode's reference
        energies plus one set per mode; files before that, one set for both modes."""
        if prefix + "quantized_reference_energies" in state:
            state[prefix + "reference_energies"] = state.pop(prefix + "quantized_reference_energies")
        if hasattr(self, "conservative_reference_energies") and prefix + "reference_energies" in state:
            state.setdefault(prefix + "conservative_reference_energies", state[prefix + "reference_energies"])

    def set_energy_reference(self, reference_energies, energy_scale: float) -> None:
        ref = torch.as_tensor(reference_energies, dtype=torch.float64, device=self.energy_scale.device)
        self.reference_energies.copy_(ref)
        self.energy_scale.fill_(float(energy_scale))

    def forward(
        self,
        species: torch.Tensor,  # [n_atoms]
        positions: torch.Tensor,  # [n_atoms, 3]
        receivers: torch.Tensor,  # [n_edges]
        senders: torch.Tensor,  # [n_edges]
        shifts: torch.Tensor,  # [n_edges, 3]
        batch: torch.Tensor,  # [n_atoms]
        n_graphs: int,
    ) -> torch.Tensor:  # [n_graphs] float64
        n = positions.shape[0]
        F, L, H = self.num_features, self.num_layers, self.num_heads
        vec = positions.index_select(0, senders) - positions.index_select(0, receivers) + shifts  # [E, 3]
        r = torch.linalg.norm(vec, dim=-1)  # [E]
        sph = self.sph(vec)  # [E, 3]
        sph4 = torch.cat([torch.zeros_like(sph[:, :1]), sph], dim=1)  # [E, 4]
        envelope = self.envelope(r)  # [E]
        # one matmul for all layers; unbind (not indexing) keeps the backward a single stack
        radial = self.radial(self.rbf(r)).view(-1, L, 3 * F + H).unbind(1)  # L x [E, 3F + H]

        h = self.embedding(species)  # [n, F]
        v = torch.zeros((n, 3, F), dtype=h.dtype, device=h.device)  # [n, 3, F]
        for i, layer in enumerate(self.layers):
            filters, bias = radial[i].split([3 * F, H], dim=1)  # [E, 3F], [E, H]
            attn_bias = -nn.functional.softplus(bias)
            h, v = layer(h, v, filters, attn_bias, envelope, sph4, receivers, senders)

        atomic = self.readout(h).squeeze(-1) * self.energy_scale  # [n]
        references = self.reference_energies
        # (nested: TorchScript resolves a hasattr standing alone statically, so FP32 models compile)
        if hasattr(self, "conservative_reference_energies"):  # noqa: SIM102
            if self.conservative:
                references = self.conservative_reference_energies
        atomic = atomic.to(torch.float64) + references.index_select(0, species)
        return scatter_sum(atomic, batch, n_graphs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class EnergyForces(nn.Module):
    """Energy and forces in one call; scriptable (torch.jit.script) for deployment."""

    def __init__(self, potential: GAQPotential):
        super().__init__()
        self.potential = potential

    def forward(
        self,
        species: torch.Tensor,
        positions: torch.Tensor,
        receivers: torch.Tensor,
        senders: torch.Tensor,
        shifts: torch.Tensor,
        batch: torch.Tensor,
        n_graphs: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        positions = positions.detach().requires_grad_(True)
        energy = self.potential(species, positions, receivers, senders, shifts, batch, n_graphs)
        grad = torch.autograd.grad([energy.sum()], [positions], allow_unused=True)[0]
        if grad is None:  # no atom has a neighbour: the energy does not depend on positions
            grad = torch.zeros_like(positions)
        return energy.detach(), -grad


def energy(model: GAQPotential, batch) -> torch.Tensor:
    """Total energies [n_graphs] (float64) of a GraphBatch, without forces (energy-only data)."""
    return model(
        batch.species, batch.positions, batch.receivers, batch.senders, batch.shifts, batch.batch, batch.n_graphs
    )


def energy_and_forces(model: GAQPotential, batch, training: bool = False):
    """Total energies [n_graphs] (float64) and forces [n_atoms, 3] = -dE/dr (autograd)."""
    positions = batch.positions
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = model(
            batch.species, positions, batch.receivers, batch.senders, batch.shifts, batch.batch, batch.n_graphs
        )
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=training)
    return energy, -grad
