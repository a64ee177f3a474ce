"""One config for quantizing a GAQPotential, with the presets of the paper and the baselines.
(The QAT schedule, staged warm-up and LEE weight belong to the trainer: gaq_calc.train.TrainConfig.)"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class QuantConfig:
    scalar_weight_bits: int = 8  # Linear layers of the scalar (l=0) branch, radial net and readout
    vector_weight_bits: int = 4  # channel-mixing Linear layers of the vector (l=1) branch
    scalar_act_bits: Optional[int] = 8  # inputs of scalar-branch Linear layers; None = not quantized
    vector_act_bits: Optional[int] = 8  # inputs of vector-branch Linear layers; None = not quantized
    # mddq (GAQ) | frame (linear in an equivariant local frame) | cartesian (component-wise, naive)
    # | kmeans (SVQ-KMeans: hard assignment to k-means centroids)
    vector_method: str = "mddq"
    per_channel_weights: bool = True  # per-output-channel weight steps; False = one step per tensor
    codebook_size: Optional[int] = None  # MDDQ directions / k-means centroids; None = 2^vector_act_bits
    drop_prob: float = 0.0  # QDrop: probability that an activation element skips quantization (training)
    protect_prob: float = 0.0  # Degree-Quant: max probability that a node row skips quantization (training)
    range_percentile: Optional[float] = None  # Degree-Quant: activation range from this percentile of |x|
    # mixed precision: Linear layers whose module name starts with one of these prefixes keep their input
    # activations unrounded (weights stay quantized). The per-layer sensitivity analysis
    # (scripts/quant_sensitivity.py) found the radial filters and the readout carry most of the A8 error.
    float_act_layers: tuple = ()

    def __post_init__(self):
        self.float_act_layers = tuple(self.float_act_layers)

    def to_dict(self) -> dict:
        # plain JSON-able data: a tuple would come back from JSON (artifact metadata) as a list
        return {**asdict(self), "float_act_layers": list(self.float_act_layers)}

    @property
    def directions(self) -> int:
        return self.codebook_size or 2 ** (self.vector_act_bits or 8)


_W4A8_CARTESIAN = dict(vector_method="cartesian")

PRESETS = {
    # GAQ: 4-bit weights on the equivariant branch, 8-bit elsewhere, 8-bit activations, MDDQ vectors
    "w4a8": QuantConfig(),
    "w8a8": QuantConfig(vector_weight_bits=8),
    # naive INT8: 8-bit everywhere, per-tensor min-max, vectors quantized per Cartesian component
    "naive_int8": QuantConfig(vector_weight_bits=8, vector_method="cartesian", per_channel_weights=False),
    # beyond the paper: 8-bit l=1 activations in an equivariant local frame (exactly equivariant)
    "w4a8_frame": QuantConfig(vector_method="frame"),
    "w8a8_frame": QuantConfig(vector_weight_bits=8, vector_method="frame"),
    # the same with the radial-filter and readout inputs unrounded (the layers where A8 error concentrates)
    "w4a8_frame_mp": QuantConfig(vector_method="frame", float_act_layers=("radial.", "readout.")),
    "w8a8_frame_mp": QuantConfig(vector_weight_bits=8, vector_method="frame", float_act_layers=("radial.", "readout.")),
    # published baselines at the same W4A8 bit widths, vectors quantized per Cartesian component
    "lsq_w4a8": QuantConfig(**_W4A8_CARTESIAN),
    "qdrop_w4a8": QuantConfig(**_W4A8_CARTESIAN, drop_prob=0.5),
    "degree_quant_w4a8": QuantConfig(**_W4A8_CARTESIAN, protect_prob=0.2, range_percentile=99.9),
    "svq_kmeans_w4a8": QuantConfig(vector_method="kmeans"),
    # weights only: exactly equivariant (channel mixing with quantized weights still commutes with R)
    "w4_weights_only": QuantConfig(scalar_act_bits=None, vector_act_bits=None),
}


def preset(name: str) -> QuantConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown quantization preset {name!r}; known: {sorted(PRESETS)}")
    return QuantConfig(**PRESETS[name].to_dict())
