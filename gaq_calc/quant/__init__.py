"""Quantization: primitives (linear/LSQ, spherical codebooks, Geometric STE, MDDQ, local frames, k-means),
the quantizer kinds, quantized layers (QuantLinear for QAT, PackedLinear for inference), the inference
modes, config presets, and the prepare/calibrate/convert entry points."""

from gaq_calc.quant.api import (
    calibrate,
    convert,
    fit_conservative_reference,
    fit_quantized_reference,
    prepare,
    set_vector_quantization,
    storage_bytes,
)
from gaq_calc.quant.config import PRESETS, QuantConfig, preset
from gaq_calc.quant.kinds import ActKind
from gaq_calc.quant.modes import MODES, check_mode, set_mode
from gaq_calc.quant.modules import (
    ActQuantizer,
    FrameQuantizer,
    IdentityQuantizer,
    KMeansQuantizer,
    LinearQuantizer,
    MDDQQuantizer,
    PackedLinear,
    QuantLinear,
    WeightQuantizer,
)
from gaq_calc.quant.packing import pack_int4, unpack_int4
from gaq_calc.quant.primitives import (
    covering_radius,
    fake_quantize,
    fibonacci_sphere,
    frame_quantize,
    local_frame,
    mddq,
    nearest_centroid,
    qrange,
    quantize_direction,
    quantize_int,
    round_ste,
)

__all__ = [
    "MODES", "PRESETS", "ActKind", "ActQuantizer", "FrameQuantizer", "IdentityQuantizer", "KMeansQuantizer",
    "LinearQuantizer", "MDDQQuantizer", "PackedLinear", "QuantConfig", "QuantLinear", "WeightQuantizer",
    "calibrate", "check_mode", "convert", "covering_radius", "fake_quantize", "fibonacci_sphere",
    "fit_conservative_reference", "fit_quantized_reference", "frame_quantize", "local_frame", "mddq",
    "nearest_centroid", "pack_int4",
    "prepare", "preset", "qrange", "quantize_direction", "quantize_int", "round_ste", "set_mode",
    "set_vector_quantization", "storage_bytes", "unpack_int4",
]  # fmt: skip
