"""PackedLinear: the scriptable inference layer of the exported artifact.

Weights are stored as integer codes (4-bit packed two per byte, or int8) with per-channel steps and
dequantized once per process (reference kernel: dequantize, then a float matmul). Inputs are
quantized exactly as in QAT (scalar: linear; l=1: local frame, MDDQ or Cartesian), so the artifact
reproduces the QAT-converted model. With round_activations=False (the "conservative" mode) inputs
are not rounded: the energy is then a smooth function of the positions and forces are its exact
gradient, with the quantized weights unchanged.
"""
from typing import Optional

import torch
from torch import nn

from gaq_calc.export.packing import pack_int4, unpack_int4
from gaq_calc.quant.primitives import local_frame

# activation quantizer kinds
ACT_NONE, ACT_LINEAR, ACT_FRAME, ACT_MDDQ = 0, 1, 2, 3


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).detach() + (x - x.detach())


def _linear_quantize(x: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    return _round_ste(torch.clamp(x / step, -qmax, qmax)) * step


class PackedLinear(nn.Module):
    def __init__(self, codes: torch.Tensor, weight_step: torch.Tensor, weight_bits: int,
                 bias: Optional[torch.Tensor], act_kind: int, act_step: torch.Tensor, act_bits: int,
                 codebook: torch.Tensor):
        super().__init__()
        self.in_features = int(codes.shape[1])
        self.weight_bits = int(weight_bits)
        self.register_buffer("packed", pack_int4(codes) if weight_bits == 4 else codes.clone())
        self.register_buffer("weight_step", weight_step.detach().clone())  # [out, 1] or [1, 1]
        self.has_bias = bias is not None
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(0))
        self.act_kind = int(act_kind)
        self.act_bits = int(act_bits)
        self.act_qmax = 2 ** (int(act_bits) - 1) - 1 if act_bits else 0  # signed linear codes
        self.act_levels = 2 ** int(act_bits) - 1 if act_bits else 0  # MDDQ magnitudes (unsigned)
        self.register_buffer("act_step", act_step.detach().clone().reshape(()))
        self.register_buffer("codebook", codebook.detach().clone())
        self.round_activations = True
        self.register_buffer("weight", torch.zeros(0))  # dequantized cache, filled on first use

    def codes(self) -> torch.Tensor:
        if self.weight_bits == 4:
            return unpack_int4(self.packed, self.in_features)
        return self.packed

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight.numel() == 0:
            self.weight = self.codes().to(self.weight_step.dtype) * self.weight_step
        return self.weight

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.act_kind  # (literals: TorchScript cannot read the module-level ACT_* constants)
        if kind == 0 or not self.round_activations:  # ACT_NONE
            return x
        if kind == 1:  # ACT_LINEAR
            return _linear_quantize(x, self.act_step, self.act_qmax)
        if kind == 2:  # ACT_FRAME, x [..., 3, C]: components in the equivariant local frame
            frame = local_frame(x.detach())  # [..., 3, 3]
            q = _linear_quantize(frame @ x, self.act_step, self.act_qmax)
            return frame.transpose(-1, -2) @ q
        # MDDQ, x [..., 3, C]: magnitude (unsigned linear) times nearest codeword, Geometric STE
        v = x.transpose(-1, -2)  # [..., C, 3]
        norm = torch.sqrt((v * v).sum(-1, keepdim=True) + 1e-24)
        magnitude = _round_ste(torch.clamp(norm / self.act_step, 0, self.act_levels)) * self.act_step
        u = v / norm
        u0 = u.detach()
        nearest = self.codebook.index_select(0, torch.argmax(u0 @ self.codebook.t(), dim=-1).reshape(-1))
        tangent = (u - u0) - u0 * ((u - u0) * u0).sum(-1, keepdim=True)  # (I - u u^T) du, zero forward
        direction = nearest.reshape(u0.shape) + tangent
        return (magnitude * direction).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: Optional[torch.Tensor] = self.bias if self.has_bias else None
        return nn.functional.linear(self.quantize_input(x), self.dequantized_weight(), bias)
