"""QuantLinear: a Linear with fake-quantized weights and inputs (QAT), convertible to integer storage."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from gaq_calc.quant.primitives import (fake_quantize, fibonacci_sphere, frame_quantize, kmeans_centroids,
                                       local_frame, mddq, nearest_centroid, qrange, quantize_int)

VECTOR_METHODS = ("mddq", "frame", "cartesian", "kmeans")


class QuantLinear(nn.Module):
    """y = x_q @ W_q^T + b with W_q per-output-channel symmetric (LSQ) and x_q quantized per `act`.

    branch="scalar": x [..., in] quantized by a per-tensor linear quantizer.
    branch="vector": x [..., 3, in] (l=1 features, components on dim -2), quantized by
      "mddq": magnitude x nearest direction of a spherical codebook (GAQ, Geometric STE);
      "frame": linear on the components in an equivariant local frame (exactly equivariant);
      "cartesian": linear on the x, y, z components (the naive and LSQ/QDrop/Degree-Quant baselines);
      "kmeans": nearest of `directions` k-means centroids of calibration vectors, hard assignment and
                no gradient through it (the SVQ-KMeans baseline).
    Baseline options: drop_prob (QDrop: each activation element stays unquantized with this
    probability in training), protect_prob (Degree-Quant: node rows stay unquantized in training with
    probability protect_prob x their in-degree rank), range_percentile (Degree-Quant: calibrated range
    from a percentile of |x| instead of the maximum).
    """

    def __init__(self, linear: nn.Linear, branch: str, weight_bits: int, act_bits: Optional[int],
                 vector_method: str = "mddq", directions: int = 256, per_channel: bool = True,
                 drop_prob: float = 0.0, protect_prob: float = 0.0, range_percentile: Optional[float] = None):
        super().__init__()
        if branch not in ("scalar", "vector"):
            raise ValueError(f"branch must be 'scalar' or 'vector', not {branch!r}")
        if vector_method not in VECTOR_METHODS:
            raise ValueError(f"vector_method must be one of {VECTOR_METHODS}, not {vector_method!r}")
        self.branch = branch
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.vector_method = vector_method
        self.weight = nn.Parameter(linear.weight.detach().clone())  # [out, in]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        _, qmax = qrange(weight_bits)
        w_abs = self.weight.detach().abs()
        w_max = w_abs.amax(dim=1, keepdim=True) if per_channel else w_abs.max().reshape(1, 1)
        # steps are learned as logarithms: Adam's update is then a relative change of the step (a raw
        # step of 1e-3 moved by lr-sized updates goes negative within a few hundred steps; measured)
        self.weight_log_step = nn.Parameter((w_max.clamp_min(1e-8) / qmax).log())  # [out, 1], or [1, 1]
        self.act_log_step = nn.Parameter(torch.zeros((), dtype=self.weight.dtype))
        if vector_method == "kmeans":  # filled from calibration data
            self.register_buffer("codebook", torch.zeros(directions, 3, dtype=self.weight.dtype))
        else:
            self.register_buffer("codebook", torch.from_numpy(fibonacci_sphere(directions)).to(self.weight.dtype))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.quantize_weights = True
        self.quantize_acts = act_bits is not None
        self.observing = False  # while True, every batch widens the activation range (calibration)
        self.drop_prob = drop_prob
        self.protect_prob = protect_prob
        self.range_percentile = range_percentile
        self.node_degree: Optional[torch.Tensor] = None  # [n_atoms], set per batch for Degree-Quant
        self._samples: list = []  # calibration vectors for k-means

    @property
    def weight_step(self) -> torch.Tensor:
        return self.weight_log_step.exp()

    @property
    def act_step(self) -> torch.Tensor:
        return self.act_log_step.exp()

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Min-max (or percentile) range over the batches seen: the step covers the largest |x|, or
        |v| for MDDQ, or the largest local-frame component for "frame"."""
        if x.numel() == 0:  # a batch without edges says nothing about the range of edge activations
            return
        bits = int(self.act_bits)
        if self.branch == "vector" and self.vector_method == "kmeans":
            vectors = x.detach().transpose(-1, -2).reshape(-1, 3)
            self._samples.append(vectors[torch.randperm(len(vectors))[:4096]].cpu())
        if self.branch == "vector" and self.vector_method in ("mddq", "kmeans"):
            values, levels = x.norm(dim=-2), 2**bits - 1  # magnitudes are unsigned
        elif self.branch == "vector" and self.vector_method == "frame":
            values, levels = (local_frame(x) @ x).abs(), qrange(bits)[1]
        else:
            values, levels = x.abs(), qrange(bits)[1]
        values = values.reshape(-1)
        if self.range_percentile is not None and values.numel() > 1:
            k = max(1, int(self.range_percentile / 100.0 * values.numel()))
            peak = values.kthvalue(k).values
        else:
            peak = values.max()
        step = float(peak.clamp_min(1e-8)) / levels
        if bool(self.calibrated):
            step = max(step, float(self.act_step))
        self.act_log_step.fill_(math.log(step))
        self.calibrated.fill_(True)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """After the calibration batches: fit the k-means codebook (SVQ-KMeans) from what was seen."""
        if self._samples:
            data = torch.cat(self._samples).to(self.codebook.dtype)
            self.codebook.copy_(kmeans_centroids(data, self.codebook.shape[0], seed=0))
            self._samples = []

    def _quantize_values(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if self.branch == "vector" and self.vector_method == "mddq":
            v = x.transpose(-1, -2)  # [..., in, 3]
            return mddq(v, self.codebook, self.act_step, bits).transpose(-1, -2)
        if self.branch == "vector" and self.vector_method == "frame":
            return frame_quantize(x, self.act_step, bits)
        if self.branch == "vector" and self.vector_method == "kmeans":
            return nearest_centroid(x.transpose(-1, -2), self.codebook).transpose(-1, -2)
        return fake_quantize(x, self.act_step, bits)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_acts or self.act_bits is None:
            return x
        if self.observing or not bool(self.calibrated):
            if not self.training and not self.observing:
                raise RuntimeError("activation quantizer used uncalibrated in eval mode; calibrate first")
            self._observe(x)
        if self.vector_method == "kmeans" and self.branch == "vector" and self.observing:
            return x  # the codebook exists only once calibration has finished
        xq = self._quantize_values(x, int(self.act_bits))
        if self.training and self.drop_prob > 0:  # QDrop: randomly keep full-precision elements
            keep = torch.rand_like(x) < self.drop_prob
            xq = torch.where(keep, x, xq)
        if self.training and self.protect_prob > 0 and self.node_degree is not None \
                and x.shape[0] == self.node_degree.shape[0]:
            # Degree-Quant protective masking: high in-degree nodes stay full precision more often
            rank = self.node_degree.argsort().argsort().to(x.dtype) / max(1, x.shape[0] - 1)  # [n] in [0, 1]
            protect = torch.rand_like(rank) < self.protect_prob * rank
            xq = torch.where(protect.view(-1, *([1] * (x.dim() - 1))), x, xq)
        return xq

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weights:
            return self.weight
        return fake_quantize(self.weight, self.weight_step, self.weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


def require_inference_ready(qat: QuantLinear, what: str) -> None:
    """convert and export freeze a QuantLinear: every quantizer on, activation ranges calibrated."""
    if not qat.quantize_weights or (qat.act_bits is not None and not qat.quantize_acts):
        raise ValueError(f"{what} needs every quantizer switched on (is a staged warm-up still running?)")
    if qat.act_bits is not None and not bool(qat.calibrated):
        raise ValueError(f"{what} needs calibrated activation ranges: run the QAT model (or calibrate) first")


class IntLinear(nn.Module):
    """Inference form of QuantLinear: integer weight codes (int8 storage) and their per-channel steps.

    Dequantizes the weights once per call (reference kernel); the activation quantizer is carried over
    unchanged, so outputs equal the QAT model's for the same inputs.
    """

    def __init__(self, qat: QuantLinear):
        super().__init__()
        require_inference_ready(qat, "convert")
        step = qat.weight_step.detach().clone()
        self.register_buffer("weight_codes", quantize_int(qat.weight.detach(), step, qat.weight_bits))
        self.register_buffer("weight_step", step)
        self.weight_bits = qat.weight_bits
        self.bias = None if qat.bias is None else nn.Parameter(qat.bias.detach().clone(), requires_grad=False)
        # the activation quantizer, without the float weights
        act = copy.deepcopy(qat)
        for name in ("weight", "bias", "weight_log_step"):
            act._parameters.pop(name, None)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_codes.to(self.weight_step.dtype) * self.weight_step
        return nn.functional.linear(self.act.quantize_input(x), weight, self.bias)
