"""Loading models: `load_model` reads a model file (FP32, or quantization-prepared when the file records a
quant config); `load_energy_forces` is the one path from any model (a shipped name, a model file or
folder, an artifact, or a network in memory) to an energy-and-forces callable in an inference mode on a
kernel. GAQCalculator, gaq-eval and the benchmarks load through it."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from gaq_calc.model import GAQPotential, ModelConfig
from gaq_calc.model.network import EnergyForces
from gaq_calc.model.serialization import ModelFileError, read_model_file, upgrade_state_dict
from gaq_calc.quant import PackedLinear, QuantConfig, QuantLinear, check_mode, prepare, set_mode

#: the kernels a user picks from (GAQCalculator, the MD protocols); see load_energy_forces
KERNELS = ("auto", "fused", "reference")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _read_checkpoint(path: str | Path, dtype: torch.dtype, device: str | torch.device):
    """(model in eval mode, the model file's contents)."""
    data = read_model_file(path)
    try:
        model = GAQPotential(ModelConfig.from_dict(data["model_config"]))
        if data.get("quant_config"):
            model = prepare(model, QuantConfig(**data["quant_config"]))
        model.load_state_dict(upgrade_state_dict(model, data["state_dict"]))  # (older layouts renamed)
    except Exception as err:
        raise ModelFileError(f"{path}: model file does not match the network ({err})") from err
    return model.to(device=device, dtype=dtype).eval(), data


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model in eval mode, metadata) from a model file; a quantized model is in its quantized mode."""
    model, data = _read_checkpoint(path, dtype, device)
    return model, data.get("metadata", {})


@dataclass
class LoadedModel:
    """A model ready to evaluate, from load_energy_forces."""

    #: (species, positions, receivers, senders, shifts, batch, n_graphs) -> (energies [n_graphs] float64, forces)
    energy_forces: Callable
    #: the eager network, in the chosen mode (for an artifact: rebuilt from the file's tensors)
    potential: nn.Module
    kernel: str  # "fused" or "reference" (autograd through the network: eager or TorchScript)
    dtype: torch.dtype
    mode: Optional[str]  # None: as trained (a quantized model rounds its activations)
    quantized: bool
    cutoff: float
    species: list
    path: Optional[Path] = None  # None for a network given in memory
    artifact: bool = False
    quant_config: Optional[dict] = None
    metadata: dict = field(default_factory=dict)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def load_energy_forces(model="azobenzene_fp32", dtype="float32", device="cpu", mode: Optional[str] = None,
                       kernel: str = "auto", jit: bool = True, int_gemm: str = "auto") -> LoadedModel:  # fmt: skip
    """Load a model and choose its kernel.

    model: a shipped name, a model file or folder, a gaq-train run folder, an artifact (gaq-export), or a
    network in memory (a GAQPotential, a prepared or converted quantized model, or an EnergyForces around
    one; it is copied, never changed).
    dtype: "float32" or "float64" (a torch dtype also does); artifacts are float32.
    mode: "conservative" or "quantized" (quant.set_mode); None leaves a quantized model as trained
    (quantized). "quantized" on an FP32 model is a ValueError.
    kernel: "auto" runs the fused C++ CPU kernel where it applies and the reference path elsewhere (with a
    warning where the kernel cannot be built); "fused" requires it; "reference" runs the network with
    autograd forces (TorchScript for FP32 checkpoints with jit=True; for an artifact, the file's own
    TorchScript, which is a program: only for artifacts you trust like code); "eager" is the reference path
    without any TorchScript (gaq-eval). int_gemm: the fused kernel's integer engine in quantized mode
    ("auto", "float", "int32" or "int32-portable"; FusedEnergyForces).
    """
    from gaq_calc.export import is_artifact, load_artifact
    from gaq_calc.models_dir import resolve_model

    dtype, device = _dtype(dtype), torch.device(device)
    if kernel not in (*KERNELS, "eager"):
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if mode is not None:
        check_mode(mode)
    path, artifact, scripted, metadata, config = None, False, None, {}, None
    if isinstance(model, nn.Module):
        potential = copy.deepcopy(model.potential if isinstance(model, EnergyForces) else model)
        potential = potential.to(device=device, dtype=dtype).eval()
        config = potential.quant_config.to_dict() if hasattr(potential, "quant_config") else None
        quantized = any(isinstance(m, (QuantLinear, PackedLinear)) for m in potential.modules())
    elif is_artifact(path := resolve_model(model)):
        # only the reference kernel runs the file's TorchScript; everything else uses the network rebuilt
        # from the file's tensors
        module, metadata = load_artifact(path, device, scripted=kernel == "reference")
        if dtype != getattr(torch, metadata["dtype"]):
            raise ValueError(f"{path.name} is a {metadata['dtype']} artifact; dtype {str(dtype)[6:]!r} needs the "
                             "checkpoint it was exported from")  # fmt: skip
        potential, scripted = module.potential, module if kernel == "reference" else None
        artifact, config = True, metadata.get("quantization")
        quantized = bool(config)
    else:
        potential, data = _read_checkpoint(path, dtype, device)
        metadata, config = data.get("metadata", {}), data.get("quant_config")
        quantized = bool(config)
    if mode == "quantized" and not quantized:
        raise ValueError(f"mode 'quantized' needs a quantized model; {path or 'the model'} is an FP32 model (it "
                         "has one mode: leave the mode at its default)")  # fmt: skip
    if quantized and mode is not None:
        for network in (potential, scripted) if scripted is not None else (potential,):
            set_mode(network, mode)
    loaded = LoadedModel(EnergyForces(potential), potential, "reference", dtype, mode, quantized,
                         float(potential.cutoff), [int(z) for z in potential.atomic_numbers.tolist()], path,
                         artifact, config, metadata)  # fmt: skip
    if kernel in ("auto", "fused") and _fused(loaded, kernel, device, int_gemm):
        return loaded
    if scripted is not None:
        loaded.energy_forces = scripted
    elif kernel != "eager" and jit and not quantized and not artifact:
        with warnings.catch_warnings():  # torch 2.13 flags TorchScript as deprecated; it still runs
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded.energy_forces = torch.jit.script(loaded.energy_forces)
    return loaded


def _fused(loaded: LoadedModel, kernel: str, device: torch.device, int_gemm: str) -> bool:
    """Put the fused kernel in `loaded` where it applies; kernel="fused" insists, "auto" falls back (with a
    warning when the kernel cannot be built on this CPU; silently for a model or mode it does not cover)."""
    from gaq_calc.kernels import FusedEnergyForces, KernelUnavailable, load_extension

    try:
        if device.type != "cpu":
            raise KernelUnavailable(f"the fused kernel runs on CPU, not {device.type}")
        load_extension()
    except KernelUnavailable as err:
        if kernel == "fused":
            raise
        if device.type == "cpu":
            warnings.warn(f"{err}; running the reference kernel", RuntimeWarning, stacklevel=4)
        return False
    try:
        loaded.energy_forces = FusedEnergyForces(loaded.potential, loaded.dtype, int_gemm)
    except KernelUnavailable:  # a model or mode it does not cover (MDDQ rounding, eager QAT rounding)
        if kernel == "fused":
            raise
        return False
    loaded.kernel = "fused"
    return True
