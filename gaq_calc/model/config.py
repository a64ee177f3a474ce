"""Model hyperparameters (So3krates-style equivariant transformer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class ModelConfig:
    species: list[int] = field(default_factory=lambda: [1, 6, 7, 8])  # atomic numbers
    cutoff: float = 5.0  # Å
    num_features: int = 64  # channels of the scalar (l=0) and of the vector (l=1) branch
    num_layers: int = 6
    num_heads: int = 4
    num_rbf: int = 16  # Bessel radial basis functions
    radial_hidden: int = 32  # width of the shared radial MLP; 0 = filters linear in the basis
    tau_init: float = 10.0  # initial inverse temperature of the cosine attention (learnable)
    envelope_exponent: int = 6  # polynomial cutoff envelope p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
