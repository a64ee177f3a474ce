"""Quantization: primitives (linear/LSQ, spherical codebooks, Geometric STE, MDDQ), modules, config,
and the prepare/convert entry points."""
from gaq_calc.quant.api import (calibrate, convert, fit_conservative_reference, prepare, set_quant_mode,
                                set_vector_quantization)
from gaq_calc.quant.config import PRESETS, QuantConfig, preset
from gaq_calc.quant.modules import IntLinear, QuantLinear
from gaq_calc.quant.primitives import (GeometricSTE, covering_radius, fake_quantize, fibonacci_sphere, mddq,
                                       qrange, quantize_direction, quantize_int, round_ste)

__all__ = ["PRESETS", "GeometricSTE", "calibrate", "fit_conservative_reference", "IntLinear", "QuantConfig", "QuantLinear", "convert", "covering_radius",
           "fake_quantize", "fibonacci_sphere", "mddq", "prepare", "preset", "qrange", "quantize_direction",
           "quantize_int", "round_ste", "set_quant_mode", "set_vector_quantization"]
