"""QuantLinear: a Linear with fake-quantized weights and inputs (QAT), convertible to integer storage."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from gaq_calc.quant.primitives import fake_quantize, fibonacci_sphere, mddq, positive, qrange, quantize_int


class QuantLinear(nn.Module):
    """y = x_q @ W_q^T + b with W_q per-output-channel symmetric (LSQ) and x_q quantized per `act`.

    branch="scalar": x [..., in] quantized by a per-tensor linear quantizer.
    branch="vector": x [..., 3, in] (l=1 features, components on dim -2), quantized by MDDQ on the
    component axis, or component-wise ("cartesian", the naive baseline).
    """

    def __init__(self, linear: nn.Linear, branch: str, weight_bits: int, act_bits: Optional[int],
                 vector_method: str = "mddq", directions: int = 256, per_channel: bool = True):
        super().__init__()
        if branch not in ("scalar", "vector"):
            raise ValueError(f"branch must be 'scalar' or 'vector', not {branch!r}")
        self.branch = branch
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.vector_method = vector_method
        self.weight = nn.Parameter(linear.weight.detach().clone())  # [out, in]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        _, qmax = qrange(weight_bits)
        w_abs = self.weight.detach().abs()
        w_max = w_abs.amax(dim=1, keepdim=True) if per_channel else w_abs.max().reshape(1, 1)
        self.weight_step = nn.Parameter(w_max.clamp_min(1e-8) / qmax)  # [out, 1], or [1, 1] per tensor
        self.act_step = nn.Parameter(torch.ones((), dtype=self.weight.dtype))
        self.register_buffer("codebook", torch.from_numpy(fibonacci_sphere(directions)).to(self.weight.dtype))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.quantize_weights = True
        self.quantize_acts = act_bits is not None
        self.observing = False  # while True, every batch widens the activation range (calibration)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Min-max range: the step covers max |x| (or max |v| for MDDQ) over the batches seen."""
        bits = int(self.act_bits)
        if self.branch == "vector" and self.vector_method == "mddq":
            peak, levels = x.norm(dim=-2).max(), 2**bits - 1  # magnitudes are unsigned
        else:
            peak, levels = x.abs().max(), qrange(bits)[1]
        step = float(peak.clamp_min(1e-8)) / levels
        if bool(self.calibrated):
            step = max(step, float(self.act_step))
        self.act_step.fill_(step)
        self.calibrated.fill_(True)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_acts or self.act_bits is None:
            return x
        if self.observing or not bool(self.calibrated):
            if not self.training and not self.observing:
                raise RuntimeError("activation quantizer used uncalibrated in eval mode; calibrate first")
            self._observe(x)
        bits = int(self.act_bits)
        if self.branch == "vector" and self.vector_method == "mddq":
            v = x.transpose(-1, -2)  # [..., in, 3]
            return mddq(v, self.codebook, self.act_step, bits).transpose(-1, -2)
        return fake_quantize(x, self.act_step, bits)

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weights:
            return self.weight
        return fake_quantize(self.weight, self.weight_step, self.weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class IntLinear(nn.Module):
    """Inference form of QuantLinear: integer weight codes (int8 storage) and their per-channel steps.

    Dequantizes the weights once per call (reference kernel); the activation quantizer is carried over
    unchanged, so outputs equal the QAT model's for the same inputs.
    """

    def __init__(self, qat: QuantLinear):
        super().__init__()
        if not qat.quantize_weights or (qat.act_bits is not None and not qat.quantize_acts):
            raise ValueError("convert needs every quantizer switched on (is a staged warm-up still running?)")
        if qat.act_bits is not None and not bool(qat.calibrated):
            raise ValueError("convert needs calibrated activation ranges: run the QAT model (or calibrate) first")
        step = positive(qat.weight_step.detach()).clone()
        self.register_buffer("weight_codes", quantize_int(qat.weight.detach(), step, qat.weight_bits))
        self.register_buffer("weight_step", step)
        self.weight_bits = qat.weight_bits
        self.bias = None if qat.bias is None else nn.Parameter(qat.bias.detach().clone(), requires_grad=False)
        # the activation quantizer, without the float weights
        act = copy.deepcopy(qat)
        for name in ("weight", "bias", "weight_step"):
            act._parameters.pop(name, None)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_codes.to(self.weight_step.dtype) * self.weight_step
        return nn.functional.linear(self.act.quantize_input(x), weight, self.bias)
