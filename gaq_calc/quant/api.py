"""prepare (FP32 -> QAT), calibrate, convert (QAT -> packed integer weights) for a GAQPotential."""

from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from gaq_calc.quant.config import QuantConfig
from gaq_calc.quant.modes import set_mode
from gaq_calc.quant.modules import ActQuantizer, IdentityQuantizer, PackedLinear, QuantLinear

#: Linear layers acting on l=1 features (the vector branch); every other Linear is scalar branch.
VECTOR_LINEARS = ("vector_mix",)


def branch_of(name: str) -> str:
    return "vector" if name.split(".")[-1] in VECTOR_LINEARS else "scalar"


def _swap(model: nn.Module, build) -> nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            replacement = build(full, child)
            if replacement is not None:
                replacement.train(child.training)  # keep the model's train/eval mode
                setattr(module, child_name, replacement)
    return model


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a QuantLinear of its branch (QAT-ready)."""

    def build(name, child):
        if type(child) is not nn.Linear:
            return None
        float_acts = name.startswith(tuple(config.float_act_layers))  # mixed precision
        options = dict(
            per_channel=config.per_channel_weights,
            drop_prob=config.drop_prob,
            protect_prob=config.protect_prob,
            range_percentile=config.range_percentile,
        )
        if branch_of(name) == "vector":
            return QuantLinear(
                child,
                "vector",
                config.vector_weight_bits,
                None if float_acts else config.vector_act_bits,
                config.vector_method,
                config.directions,
                **options,
            )
        return QuantLinear(
            child, "scalar", config.scalar_weight_bits, None if float_acts else config.scalar_act_bits, **options
        )

    prepared = _swap(copy.deepcopy(model), build)
    prepared.quant_config = config
    # the conservative mode's reference energies (quant.modes): the FP32 model's until fitted
    # (fit_conservative_reference); reference_energies serve the quantized mode
    if hasattr(prepared, "reference_energies"):
        prepared.register_buffer("conservative_reference_energies", prepared.reference_energies.clone())
    if config.protect_prob > 0:
        prepared.register_forward_pre_hook(_record_in_degrees)
    return prepared


def _record_in_degrees(model: nn.Module, args) -> None:
    """Degree-Quant needs each node's in-degree: GAQPotential.forward(species, positions, receivers, ...)."""
    positions, receivers = args[1], args[2]
    degree = torch.bincount(receivers, minlength=positions.shape[0])  # [n_atoms]
    for module in model.modules():
        if isinstance(module, ActQuantizer) and hasattr(module, "node_degree"):
            module.node_degree = degree


def set_vector_quantization(model: nn.Module, enabled: bool) -> None:
    """Staged warm-up: switch the vector branch's quantizers off (first epochs) or on."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.branch == "vector":
            module.weight_quantizer.enabled = enabled
            module.act_quantizer.enabled = enabled and not isinstance(module.act_quantizer, IdentityQuantizer)


def _reference_residuals(model: nn.Module, batches, run) -> np.ndarray:
    """Least-squares per-element shift (eV) that best fits labels - run(model, batch) over `batches`
    (minimum-norm when the composition is fixed)."""
    n_species = model.reference_energies.shape[0]
    counts, errors = [], []
    for batch in batches:
        energies = run(model, batch).detach().double().cpu().numpy()
        one_hot = torch.nn.functional.one_hot(batch.species, n_species).double()
        counts.append(
            torch.zeros(batch.n_graphs, n_species, dtype=torch.float64).index_add_(0, batch.batch, one_hot).numpy()
        )
        errors.append(batch.energy.double().cpu().numpy() - energies)
    correction, *_ = np.linalg.lstsq(np.concatenate(counts), np.concatenate(errors), rcond=None)
    return torch.as_tensor(correction, dtype=torch.float64, device=model.reference_energies.device)


def fit_quantized_reference(model: nn.Module, batches, run) -> torch.Tensor:
    """Bias correction of the quantized mode: rounded activations shift the mean energy (W4A8 azobenzene,
    mixed precision: -3.7 meV per molecule on test frames, 4.4 meV MAE once that mean is removed instead
    of 5.4). The reference energies are a buffer added after the readout, never trained, so QAT leaves
    the shift in place. Per-element corrections are fitted by least squares on `batches` (training frames)
    and added to model.reference_energies; an exact energy shift that changes no rounding decision and no
    force. run(model, batch) -> energies [n_graphs]. Returns the correction (eV per element)."""
    set_mode(model, "quantized")
    correction = _reference_residuals(model, batches, run)
    with torch.no_grad():
        model.reference_energies.add_(correction)
    return correction


def fit_conservative_reference(model: nn.Module, batches, run) -> torch.Tensor:
    """Bias correction of the conservative mode: QAT adapts the network to rounded activations, and
    leaving them unrounded shifts every atomic energy by a near-constant amount (W4A8 azobenzene:
    -62 meV per molecule on average, 1.9 meV MAE once that mean is removed; measured on training frames).
    Per-element corrections are fitted by least squares on `batches` (training frames; minimum-norm
    when the composition is fixed) and stored in model.conservative_reference_energies.
    run(model, batch) -> energies [n_graphs]. Returns the correction (eV per element)."""
    set_mode(model, "conservative")
    with torch.no_grad():  # the quantized mode's references, plus the fitted correction below
        model.conservative_reference_energies.copy_(model.reference_energies)
    correction = _reference_residuals(model, batches, run)
    with torch.no_grad():
        model.conservative_reference_energies.copy_(model.reference_energies + correction)
    set_mode(model, "quantized")
    return correction


def round_at_bits(quantizer: ActQuantizer, bits: Optional[int]) -> None:
    """Make an activation quantizer round at `bits` with its clipping range (levels x step) unchanged:
    finer or coarser steps over the same range, for studies of the activation step (scripts/quant_sensitivity.py,
    scripts/lee_flips.py on QAT models, scripts/heating_vs_act_bits.py on converted ones). Works on the learned
    form (log_step) and the inference form (step buffer). None restores its own bits and step, which the first
    call remembers."""
    learned = hasattr(quantizer, "log_step")
    param = quantizer.log_step if learned else quantizer.step
    if not hasattr(quantizer, "_own_bits"):
        quantizer._own_bits = (quantizer.bits, param.detach().clone(), quantizer.levels())
    own_bits, own_value, own_levels = quantizer._own_bits
    quantizer.bits = own_bits if bits is None else int(bits)
    ratio = own_levels / quantizer.levels()
    with torch.no_grad():
        param.copy_(own_value + math.log(ratio) if learned else own_value * ratio)


def calibrate(model: nn.Module, batches, run) -> nn.Module:
    """Post-training calibration: activation ranges = min-max over all `batches`; run(model, batch)
    does one forward pass (e.g. energy_and_forces)."""
    quant = [m for m in model.modules() if isinstance(m, ActQuantizer) and hasattr(m, "calibrated")]
    for m in quant:
        m.calibrated.fill_(False)
        m.observing = True
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for m in quant:
            m.observing = False
    for m in quant:
        m.finish_calibration()
    return model


def convert(model: nn.Module) -> nn.Module:
    """The inference model of a prepared (QAT) model: every QuantLinear becomes a PackedLinear (integer
    weight codes, the same activation quantizer frozen); same outputs for the same inputs. Training-only
    hooks (Degree-Quant's degree recorder) are dropped. gaq-export scripts this network."""
    converted = _swap(copy.deepcopy(model), lambda name, child: PackedLinear.from_quant(child)
                      if isinstance(child, QuantLinear) else None)  # fmt: skip
    converted._forward_pre_hooks.clear()
    return converted


def storage_bytes(model: nn.Module) -> dict:
    """Bytes the model's parameters need when stored packed: quantized weights at their bit width
    (two 4-bit codes per byte) plus one float32 step per channel; everything else at its own dtype
    (float32 network, float64 reference energies). Also the count of weights at each bit width."""
    total, by_bits = 0.0, {}
    skip = set()
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer.enabled:
            n, bits = module.weight.numel(), module.weight_quantizer.bits
            by_bits[bits] = by_bits.get(bits, 0) + n
            total += n * bits / 8 + module.weight_quantizer.log_step.numel() * 4
            skip.update({id(module.weight), id(module.weight_quantizer.log_step)})
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in skip or tensor.dtype == torch.bool:
            continue
        itemsize = 8 if tensor.dtype == torch.float64 else 4
        total += tensor.numel() * itemsize
        if tensor.is_floating_point() and tensor.requires_grad:
            by_bits[32] = by_bits.get(32, 0) + tensor.numel()
    return {"packed_bytes": round(total), "weights_by_bits": {str(k): v for k, v in sorted(by_bits.items())}}
