"""gaq_calc: low-bit SO(3)-equivariant neural potential as an ASE calculator."""
from gaq_calc.calculator import GAQCalculator
from gaq_calc.model.serialization import ModelFileError, load_model

__all__ = ["GAQCalculator", "ModelFileError", "load_model"]
__version__ = "0.1.0"
