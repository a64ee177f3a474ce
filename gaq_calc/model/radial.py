"""Radial basis and smooth cutoff envelope."""

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/rc) sin(n pi r / rc) / r, n = 1..K (DimeNet/NequIP)."""

    def __init__(self, cutoff: float, num_basis: int):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", math.pi / cutoff * torch.arange(1, num_basis + 1).float())
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] -> [E, K]
        return self.prefactor * torch.sin(self.frequencies * r[:, None]) / r[:, None]


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff: 1 at r=0, vanishes with its first two derivatives at r=rc (DimeNet, p=6)."""

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        self.cutoff = cutoff
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] -> [E]
        p = self.p
        x = r / self.cutoff
        xp = x**p
        env = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * xp + p * (p + 2.0) * xp * x - p * (p + 1.0) / 2.0 * xp * x * x
        return torch.where(x < 1.0, env, torch.zeros_like(env))
