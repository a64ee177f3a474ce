"""The fused CPU kernel (fused_cpu.cpp): energy and forces of a GAQPotential in one C++ call.

The C++ source is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja are
needed; the build is cached per user) and registers the TorchScript-callable op
torch.ops.gaq.energy_forces. FusedEnergyForces gathers a model's weights once (eager FP32, eager QAT
in conservative mode, or an exported artifact in conservative mode: dequantized weights, activations
not rounded) and calls the op; forces are the exact gradient of the returned energy, written out in
C++ and tested against autograd.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import List, Tuple

import torch

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
_lock = threading.Lock()
_loaded = False


class KernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or does not support this model/mode."""


def load_extension(verbose: bool = False) -> None:
    """Compile (once per source version, cached) and load the op library; KernelUnavailable on failure."""
    global _loaded
    with _lock:
        if _loaded:
            return
        from torch.utils import cpp_extension

        flags = ["-O3", "-fno-math-errno", "-fopenmp-simd"]
        if os.uname().machine in ("x86_64", "AMD64"):
            flags.append("-march=native")  # compiled on the machine that runs it
        try:
            # one build folder per source version: a rebuild never overwrites a library that a running
            # process (a long MD run) has loaded
            digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
            cpp_extension.load(name=f"gaq_fused_cpu_{digest}", sources=[str(SOURCE)], extra_cflags=flags,
                               is_python_module=False, verbose=verbose)
        except Exception as err:  # no compiler, no ninja, read-only cache, ...
            raise KernelUnavailable(f"the fused CPU kernel could not be built ({type(err).__name__}: {err})") from err
        _loaded = True


def _child(module, name: str):
    return getattr(module, name)


def _linear_weights(module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias or empty) of nn.Linear, a QuantLinear with unrounded activations, or an
    artifact's PackedLinear in conservative mode."""
    if hasattr(module, "round_activations"):  # PackedLinear (scripted artifact)
        if module.act_kind != 0 and module.round_activations:
            raise KernelUnavailable("activations are rounded (quantized mode): use the reference kernel")
        weight = module.dequantized_weight()
        bias = module.bias if module.has_bias else torch.zeros(0)
        return weight, bias
    if hasattr(module, "quantized_weight"):  # QuantLinear (eager QAT model)
        if module.quantize_acts and module.act_bits is not None:
            raise KernelUnavailable("activations are rounded (quantized mode): use the reference kernel")
        bias = module.bias if module.bias is not None else torch.zeros(0)
        return module.quantized_weight(), bias
    bias = module.bias if module.bias is not None else torch.zeros(0)
    return module.weight, bias


def gather_parameters(potential) -> Tuple[List[torch.Tensor], List[float]]:
    """The op's parameter list and constants (layout fixed in fused_cpu.cpp) from a GAQPotential or the
    `potential` submodule of an artifact."""
    with torch.no_grad():
        p: List[torch.Tensor] = [potential.embedding.weight, potential.rbf.frequencies]
        radial = potential.radial
        names = [name for name, _ in radial.named_children()]
        if len(names) == 3:
            w1, b1 = _linear_weights(_child(radial, names[0]))
            w2, _ = _linear_weights(_child(radial, names[2]))
            p += [w1, b1, w2]
        elif len(names) == 1:
            w2, _ = _linear_weights(_child(radial, names[0]))
            p += [torch.zeros(0), torch.zeros(0), w2]
        else:
            raise KernelUnavailable(f"unexpected radial network with {len(names)} modules")
        eps = None
        heads = None
        for _, layer in potential.layers.named_children():
            eps = float(layer.norm.eps) if eps is None else eps
            heads = int(layer.num_heads)
            p += [layer.norm.weight, layer.norm.bias]
            p += list(_linear_weights(layer.qk_proj))[:1]
            p += list(_linear_weights(layer.value_proj))
            p += [layer.log_tau]
            p += list(_linear_weights(layer.exchange_in))
            p += list(_linear_weights(layer.exchange_out))
            p += list(_linear_weights(layer.vector_mix))[:1]
        readout = potential.readout
        names = [name for name, _ in readout.named_children()]  # LayerNorm, Linear, SiLU, Linear
        norm = _child(readout, names[0])
        p += [norm.weight, norm.bias]
        p += list(_linear_weights(_child(readout, names[1])))
        p += list(_linear_weights(_child(readout, names[3])))
        p += [potential.energy_scale, potential.reference_energies]
        p = [t.detach().contiguous() for t in p]
    consts = [float(potential.cutoff), float(potential.envelope.p), float(potential.rbf.prefactor), eps,
              float(heads)]
    return p, consts


class FusedEnergyForces:
    """Same call as EnergyForces (species, positions, receivers, senders, shifts, batch, n_graphs) ->
    (energies [n_graphs] float64, forces [n_atoms, 3]) through the fused kernel.

    Weights are gathered at construction: build it again after changing the model or its mode."""

    def __init__(self, potential, dtype: torch.dtype = torch.float32):
        load_extension()
        params, self.consts = gather_parameters(potential)
        # cast once: float weights to the compute dtype, reference energies kept float64
        self.params = [t.to(dtype) for t in params[:-1]] + [params[-1].to(torch.float64)]
        self.dtype = dtype

    def __call__(self, species, positions, receivers, senders, shifts, batch, n_graphs: int):
        if positions.device.type != "cpu":
            raise KernelUnavailable("the fused kernel runs on CPU")
        return torch.ops.gaq.energy_forces(positions.to(self.dtype), species, receivers, senders,
                                           shifts.to(self.dtype), batch, int(n_graphs), self.params, self.consts)
