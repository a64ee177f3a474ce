"""Quantization: primitives (linear/LSQ, spherical codebooks, Geometric STE, MDDQ)."""
from gaq_calc.quant.primitives import (GeometricSTE, covering_radius, fake_quantize, fibonacci_sphere, mddq,
                                       qrange, quantize_direction, quantize_int, round_ste)

__all__ = ["GeometricSTE", "covering_radius", "fake_quantize", "fibonacci_sphere", "mddq", "qrange",
           "quantize_direction", "quantize_int", "round_ste"]
