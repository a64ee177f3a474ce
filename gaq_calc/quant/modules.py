"""Quantized Linear layers, built from one weight quantizer and one activation quantizer per method.

- `WeightQuantizer`: per-output-channel (or per-tensor) symmetric LSQ fake quantization of a weight.
- Activation quantizers, one class per `ActKind`: `IdentityQuantizer` (not rounded), `LinearQuantizer`
  (scalar branch; l=1 component-wise), `FrameQuantizer` (l=1 in the equivariant local frame),
  `MDDQQuantizer` (magnitude x codebook direction), `KMeansQuantizer` (SVQ-KMeans baseline). Each has
  one switch, `enabled` (quant.set_mode, the staged warm-up), and holds its step in one of two forms:
  learned (QAT: the parameter `log_step`, with calibration state and the baselines' training masks) or
  frozen (inference: the buffer `step`, the value QAT computed). The frozen form is TorchScript-compatible.
- `QuantLinear` (QAT): y = Q_act(x) @ Q_w(W)^T + b.
- `PackedLinear` (inference, the artifact's layer): integer weight codes (4-bit packed two per byte, or
  int8) with per-channel steps, dequantized once, and the QAT layer's activation quantizer, frozen.
  `PackedLinear.from_quant` builds it from a QuantLinear (quant.convert, gaq-export).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from gaq_calc.quant.kinds import ActKind
from gaq_calc.quant.packing import pack_int4, unpack_int4
from gaq_calc.quant.primitives import (
    fake_quantize,
    fibonacci_sphere,
    frame_quantize,
    kmeans_centroids,
    local_frame,
    mddq,
    nearest_centroid,
    qrange,
    quantize_int,
)


class WeightQuantizer(nn.Module):
    """Symmetric LSQ fake quantization of a weight [out, in]; steps learned as logarithms (Adam's update
    is then a relative change of the step: a raw step of 1e-3 moved by lr-sized updates goes negative
    within a few hundred steps; measured)."""

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool = True):
        super().__init__()
        _, qmax = qrange(bits)
        w_abs = weight.detach().abs()
        w_max = w_abs.amax(dim=1, keepdim=True) if per_channel else w_abs.max().reshape(1, 1)
        self.bits = int(bits)
        self.enabled = True  # off during the staged warm-up of the vector branch
        self.log_step = nn.Parameter((w_max.clamp_min(1e-8) / qmax).log())  # [out, 1], or [1, 1]

    def step_size(self) -> torch.Tensor:
        return self.log_step.exp()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return fake_quantize(weight, self.step_size(), self.bits)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of forward(weight) (int8 storage)."""
        return quantize_int(weight.detach(), self.step_size().detach(), self.bits)


class ActQuantizer(nn.Module):
    """Rounds a Linear's input x ([..., in], or [..., 3, in] for l=1 features); one subclass per kind.

    QAT options (learned form only): drop_prob (QDrop: each element stays unrounded with this
    probability in training), protect_prob (Degree-Quant: node rows stay unrounded in training with
    probability protect_prob x their in-degree rank), range_percentile (Degree-Quant: calibrated range
    from a percentile of |x| instead of the maximum).
    """

    KIND = ActKind.NONE
    SIGNED = True  # codes in [-qmax, qmax]; False: unsigned magnitudes in [0, 2^b - 1]

    def __init__(self, bits: int, learned: bool = True, dtype: torch.dtype = torch.float32, drop_prob: float = 0.0,
                 protect_prob: float = 0.0, range_percentile: Optional[float] = None):  # fmt: skip
        super().__init__()
        self.kind = int(self.KIND)
        self.bits = int(bits)
        self.enabled = True
        if learned:
            self.log_step = nn.Parameter(torch.zeros((), dtype=dtype))
            self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
            self.observing = False  # while True, every batch widens the range (calibration)
            self.drop_prob = drop_prob
            self.protect_prob = protect_prob
            self.range_percentile = range_percentile
            self.node_degree: Optional[torch.Tensor] = None  # [n_atoms], set per batch for Degree-Quant
        else:
            self.register_buffer("step", torch.ones((), dtype=dtype))

    def levels(self) -> int:
        """Positive code levels: qmax for signed codes, 2^b - 1 for unsigned magnitudes."""
        return qrange(self.bits)[1] if self.SIGNED else (1 << self.bits) - 1

    def step_size(self) -> torch.Tensor:
        if hasattr(self, "step"):
            return self.step
        return self.log_step.exp()

    def quantize(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The rounding itself (a primitive of quant.primitives); subclasses."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if hasattr(self, "log_step"):  # QAT: calibration and the baselines' training masks
            return self._qat_forward(x)
        return self.quantize(x, self.step)

    # --- QAT only (learned form) --------------------------------------------------------------------

    @torch.jit.unused
    def _qat_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or not bool(self.calibrated):
            if not self.training and not self.observing:
                raise RuntimeError("activation quantizer used uncalibrated in eval mode; calibrate first")
            self.observe(x)
        if self.KIND == ActKind.KMEANS and self.observing:
            return x  # the codebook exists only once calibration has finished
        xq = self.quantize(x, self.step_size())
        if self.training and self.drop_prob > 0:  # QDrop: randomly keep full-precision elements
            keep = torch.rand_like(x) < self.drop_prob
            xq = torch.where(keep, x, xq)
        if self.training and self.protect_prob > 0 and self.node_degree is not None \
                and x.shape[0] == self.node_degree.shape[0]:  # fmt: skip
            # Degree-Quant protective masking: high in-degree nodes stay full precision more often
            rank = self.node_degree.argsort().argsort().to(x.dtype) / max(1, x.shape[0] - 1)  # [n] in [0, 1]
            protect = torch.rand_like(rank) < self.protect_prob * rank
            xq = torch.where(protect.view(-1, *([1] * (x.dim() - 1))), x, xq)
        return xq

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """What the calibrated range must cover: |x| (subclasses: |v|, frame components)."""
        return x.abs()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Min-max (or percentile) range over the batches seen: the step covers the largest observed value."""
        if x.numel() == 0:  # a batch without edges says nothing about the range of edge activations
            return
        values = self.observed(x).reshape(-1)
        if self.range_percentile is not None and values.numel() > 1:
            k = max(1, int(self.range_percentile / 100.0 * values.numel()))
            peak = values.kthvalue(k).values
        else:
            peak = values.max()
        step = float(peak.clamp_min(1e-8)) / self.levels()
        if bool(self.calibrated):
            step = max(step, float(self.step_size()))
        self.log_step.fill_(math.log(step))
        self.calibrated.fill_(True)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """After the calibration batches (subclasses: fit a codebook from what was seen)."""

    def frozen(self) -> ActQuantizer:
        """The inference form: same kind, bits, codebook and switch, the step as a buffer holding the
        value QAT uses (exp of the learned logarithm, computed once)."""
        out = self._frozen_like()
        with torch.no_grad():
            out.step.copy_(self.step_size().detach().reshape(()))
        out.enabled = self.enabled
        return out

    def _frozen_like(self) -> ActQuantizer:
        return type(self)(self.bits, learned=False, dtype=self.step_size().dtype)


class IdentityQuantizer(ActQuantizer):
    """Inputs not rounded (act_bits None: mixed precision, weights-only quantization)."""

    KIND = ActKind.NONE

    def __init__(self):
        nn.Module.__init__(self)
        self.kind = int(self.KIND)
        self.bits = 0
        self.enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def frozen(self) -> ActQuantizer:
        return IdentityQuantizer()


class LinearQuantizer(ActQuantizer):
    """Per-tensor symmetric linear rounding: the scalar branch, and l=1 features component-wise
    ("cartesian": the naive, LSQ, QDrop and Degree-Quant baselines)."""

    KIND = ActKind.LINEAR

    def quantize(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, step, self.bits)


class FrameQuantizer(ActQuantizer):
    """l=1 features x [..., 3, C] rounded linearly in their equivariant local frame (exactly equivariant)."""

    KIND = ActKind.FRAME

    def quantize(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return frame_quantize(x, step, self.bits)

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        return (local_frame(x) @ x).abs()


class _CodebookQuantizer(ActQuantizer):
    SIGNED = False  # the range is set by vector magnitudes

    def __init__(self, bits: int, codebook: torch.Tensor, learned: bool = True, **options):
        super().__init__(bits, learned, codebook.dtype, **options)
        self.register_buffer("codebook", codebook.detach().clone())  # [K, 3]

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        return x.norm(dim=-2)

    def _frozen_like(self) -> ActQuantizer:
        return type(self)(self.bits, self.codebook, learned=False)


class MDDQQuantizer(_CodebookQuantizer):
    """GAQ's MDDQ on l=1 features x [..., 3, C]: magnitude (unsigned linear) times the nearest direction of
    a spherical codebook, with the Geometric STE."""

    KIND = ActKind.MDDQ

    def quantize(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return mddq(x.transpose(-1, -2), self.codebook, step, self.bits).transpose(-1, -2)


class KMeansQuantizer(_CodebookQuantizer):
    """SVQ-KMeans baseline: each l=1 vector becomes the nearest of K k-means centroids of calibration
    vectors (hard assignment; no gradient flows through it). QAT only: not exportable."""

    KIND = ActKind.KMEANS

    def __init__(self, bits: int, codebook: torch.Tensor, learned: bool = True, **options):
        super().__init__(bits, codebook, learned, **options)
        self._samples: List[torch.Tensor] = []  # calibration vectors

    def quantize(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return nearest_centroid(x.transpose(-1, -2), self.codebook).transpose(-1, -2)

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        vectors = x.detach().transpose(-1, -2).reshape(-1, 3)
        self._samples.append(vectors[torch.randperm(len(vectors))[:4096]].cpu())
        return super().observed(x)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self._samples:
            data = torch.cat(self._samples).to(self.codebook.dtype)
            self.codebook.copy_(kmeans_centroids(data, self.codebook.shape[0], seed=0))
            self._samples = []


def act_quantizer(kind: ActKind, bits: Optional[int], directions: int = 256, dtype: torch.dtype = torch.float32,
                  **options) -> ActQuantizer:  # fmt: skip
    """The learned (QAT) activation quantizer of a kind; `directions`: codebook size of MDDQ and k-means."""
    if kind == ActKind.NONE:
        return IdentityQuantizer()
    if kind == ActKind.MDDQ:
        return MDDQQuantizer(bits, torch.from_numpy(fibonacci_sphere(directions)).to(dtype), **options)
    if kind == ActKind.KMEANS:  # filled from calibration data
        return KMeansQuantizer(bits, torch.zeros(directions, 3, dtype=dtype), **options)
    return {ActKind.LINEAR: LinearQuantizer, ActKind.FRAME: FrameQuantizer}[kind](bits, dtype=dtype, **options)


class QuantLinear(nn.Module):
    """y = Q_act(x) @ Q_w(W)^T + b (QAT): a Linear's weight with its WeightQuantizer, and the
    activation quantizer of its branch and method (quant.kinds.ActKind.of)."""

    def __init__(
        self,
        linear: nn.Linear,
        branch: str,
        weight_bits: int,
        act_bits: Optional[int],
        vector_method: str = "mddq",
        directions: int = 256,
        per_channel: bool = True,
        drop_prob: float = 0.0,
        protect_prob: float = 0.0,
        range_percentile: Optional[float] = None,
    ):
        super().__init__()
        kind = ActKind.of(branch, vector_method, act_bits)
        self.branch = branch
        self.weight = nn.Parameter(linear.weight.detach().clone())  # [out, in]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_quantizer = WeightQuantizer(self.weight, weight_bits, per_channel)
        self.act_quantizer = act_quantizer(kind, act_bits, directions, self.weight.dtype, drop_prob=drop_prob,
                                           protect_prob=protect_prob, range_percentile=range_percentile)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act_quantizer(x), self.weight_quantizer(self.weight), self.bias)

    def upgrade_state(self, state: Dict[str, torch.Tensor], prefix: str) -> None:
        """Model files written before issue 14 kept the quantizers' tensors on the layer itself:
        weight_log_step, act_log_step, calibrated and codebook (for every method); renamed in place, the
        ones this layer's activation quantizer does not have are dropped."""
        if prefix + "weight_log_step" not in state:
            return
        state[prefix + "weight_quantizer.log_step"] = state.pop(prefix + "weight_log_step")
        own = set(self.act_quantizer.state_dict())
        for old, new in (("act_log_step", "log_step"), ("calibrated", "calibrated"), ("codebook", "codebook")):
            value = state.pop(prefix + old, None)
            if value is not None and new in own:
                state[prefix + "act_quantizer." + new] = value


def require_inference_ready(qat: QuantLinear, what: str) -> None:
    """convert and export freeze a QuantLinear: weights quantized (no staged warm-up running), activation
    ranges calibrated. The activation quantizer's switch (the inference mode) carries over."""
    act = qat.act_quantizer
    if not qat.weight_quantizer.enabled:
        raise ValueError(f"{what} needs every quantizer switched on (is a staged warm-up still running?)")
    if act.kind != ActKind.NONE and not bool(act.calibrated):
        raise ValueError(f"{what} needs calibrated activation ranges: run the QAT model (or calibrate) first")


class PackedLinear(nn.Module):
    """The inference form of QuantLinear (and the exported artifact's layer): integer weight codes (4-bit
    packed two per byte, or int8) with per-channel steps, dequantized once into `weight` (an empty cache
    in the file, filled on first use), and the QAT layer's activation quantizer in its frozen form, so
    the outputs equal the QAT model's for the same inputs."""

    def __init__(self, codes: torch.Tensor, weight_step: torch.Tensor, weight_bits: int,
                 bias: Optional[torch.Tensor], act_quantizer: ActQuantizer):  # fmt: skip
        super().__init__()
        self.in_features = int(codes.shape[1])
        self.weight_bits = int(weight_bits)
        self.register_buffer("packed", pack_int4(codes) if weight_bits == 4 else codes.clone())
        self.register_buffer("weight_step", weight_step.detach().clone())  # [out, 1] or [1, 1]
        self.has_bias = bias is not None
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(0))
        self.act_quantizer = act_quantizer
        self.register_buffer("weight", torch.zeros(0))  # dequantized cache, filled on first use

    @classmethod
    def from_quant(cls, qat: QuantLinear, check: bool = True) -> PackedLinear:
        """The packed layer of a QuantLinear: same weights, steps and activation quantizer. check=False
        builds the layout only (an uncalibrated layer; the artifact loader then fills in the file's tensors)."""
        if check:
            require_inference_ready(qat, "convert")
        if qat.act_quantizer.kind == ActKind.KMEANS:
            raise ValueError("SVQ-KMeans (a baseline without gradients) cannot be converted or exported")
        weight_step = qat.weight_quantizer.step_size().detach()
        codes = qat.weight_quantizer.codes(qat.weight)
        return cls(codes, weight_step, qat.weight_quantizer.bits, qat.bias, qat.act_quantizer.frozen())

    def codes(self) -> torch.Tensor:
        if self.weight_bits == 4:
            return unpack_int4(self.packed, self.in_features)
        return self.packed

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight.numel() == 0:
            self.weight = self.codes().to(self.weight_step.dtype) * self.weight_step
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: Optional[torch.Tensor] = self.bias if self.has_bias else None
        return nn.functional.linear(self.act_quantizer(x), self.dequantized_weight(), bias)

    def upgrade_state(self, state: Dict[str, torch.Tensor], prefix: str) -> None:
        """Artifacts of format 1 (before issue 14) kept the activation quantizer's tensors on the layer:
        act_step (every layer) and codebook (MDDQ; empty otherwise)."""
        if prefix + "act_step" not in state:
            return
        own = set(self.act_quantizer.state_dict())
        for old, new in (("act_step", "step"), ("codebook", "codebook")):
            value = state.pop(prefix + old, None)
            if value is not None and new in own:
                state[prefix + "act_quantizer." + new] = value
