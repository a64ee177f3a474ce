"""gaq_calc: low-bit SO(3)-equivariant neural potential as an ASE calculator."""

from gaq_calc.calculator import GAQCalculator
from gaq_calc.loading import load_model
from gaq_calc.model.serialization import ModelFileError

__all__ = ["GAQCalculator", "ModelFileError", "load_model"]
__version__ = "0.1.0"  # the one version: pyproject.toml reads it (tool.setuptools.dynamic)
