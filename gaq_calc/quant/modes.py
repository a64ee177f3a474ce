"""The inference modes of a quantized model, and the one switch between them.

- "quantized" rounds activations as in QAT (the model card's numbers). The energy jumps wherever a
  rounding decision flips, so forces are the straight-through gradient, not the exact one.
- "conservative" keeps the quantized weights and leaves activations unrounded: the energy is smooth and
  forces are its exact gradient (NVE conserves energy). Its per-element reference energies are fitted
  separately (quant.fit_conservative_reference).

An FP32 model has one mode; the switch leaves it as it is. The reference energies of each mode are both
in the network and chosen at forward time, so a model's state dict does not depend on its mode.
"""

from __future__ import annotations

import torch
from torch import nn

from gaq_calc.quant.kinds import ActKind
from gaq_calc.quant.modules import (
    FrameQuantizer,
    IdentityQuantizer,
    KMeansQuantizer,
    LinearQuantizer,
    MDDQQuantizer,
)

MODES = ("quantized", "conservative")

ACT_QUANTIZERS = (IdentityQuantizer, LinearQuantizer, FrameQuantizer, MDDQQuantizer, KMeansQuantizer)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


def _is(module: nn.Module, classes: tuple) -> bool:
    """isinstance, also for a scripted module (torch.jit.load keeps the class name only)."""
    if isinstance(module, torch.jit.RecursiveScriptModule):
        return module.original_name in {cls.__name__ for cls in classes}
    return isinstance(module, classes)


def set_mode(module: nn.Module, mode: str) -> None:
    """Switch a model to an inference mode: a QAT model, a converted or rebuilt artifact network, an
    EnergyForces around either, or an artifact's own TorchScript module (torch.jit.load)."""
    from gaq_calc.model.network import GAQPotential

    check_mode(mode)
    rounding = mode == "quantized"
    for sub in module.modules():
        if _is(sub, ACT_QUANTIZERS):
            if sub.kind != ActKind.NONE:
                sub.enabled = rounding
        elif _is(sub, (GAQPotential,)):
            if hasattr(sub, "conservative"):
                sub.conservative = not rounding
            elif hasattr(sub, "quantized_reference_energies"):  # a format-1 artifact's TorchScript
                with torch.no_grad():
                    sub.reference_energies.copy_(getattr(sub, f"{mode}_reference_energies"))
        elif hasattr(sub, "round_activations"):  # a format-1 artifact's PackedLinear (its own TorchScript)
            sub.round_activations = rounding
