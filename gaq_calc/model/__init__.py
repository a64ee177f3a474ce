"""The FP32 equivariant transformer and its config."""

from gaq_calc.model.config import ModelConfig
from gaq_calc.model.network import GAQPotential, energy, energy_and_forces

__all__ = ["GAQPotential", "ModelConfig", "energy", "energy_and_forces"]
