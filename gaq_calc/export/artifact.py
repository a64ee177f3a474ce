"""The deployable artifact: one TorchScript file (EnergyForces over a network whose quantized layers are
PackedLinear) plus a JSON metadata record stored inside it. It loads with torch.jit.load in a process
that never imports the training code; GAQCalculator reads its metadata back at load."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from gaq_calc.export.modules import ACT_FRAME, ACT_LINEAR, ACT_MDDQ, ACT_NONE, PackedLinear
from gaq_calc.model.network import EnergyForces
from gaq_calc.model.serialization import ModelFileError

ARTIFACT_FORMAT = "gaq_calc.artifact"
ARTIFACT_VERSION = 1
METADATA_FILE = "gaq_metadata.json"
MODES = ("quantized", "conservative")


def _packed(qat) -> PackedLinear:
    """PackedLinear with the same weights, steps and activation quantizer as a QAT QuantLinear."""
    from gaq_calc.quant.primitives import quantize_int

    from gaq_calc.quant.modules import require_inference_ready

    require_inference_ready(qat, "export")
    if qat.act_bits is None:
        kind = ACT_NONE
    elif qat.branch == "vector" and qat.vector_method == "kmeans":
        raise ValueError("SVQ-KMeans (a baseline without gradients) cannot be exported")
    elif qat.branch == "vector" and qat.vector_method == "frame":
        kind = ACT_FRAME
    elif qat.branch == "vector" and qat.vector_method == "mddq":
        kind = ACT_MDDQ
    else:
        kind = ACT_LINEAR
    step = qat.weight_step.detach()
    return PackedLinear(quantize_int(qat.weight.detach(), step, qat.weight_bits), step, qat.weight_bits,
                        qat.bias, kind, qat.act_step.detach(), qat.act_bits or 0,
                        qat.codebook if kind == ACT_MDDQ else torch.zeros(0, 3))


def _swap_packed(model: nn.Module) -> nn.Module:
    from gaq_calc.quant import QuantLinear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                setattr(module, name, _packed(child))
    return model


def export_artifact(model_path: str | Path, out: str | Path, extra: dict | None = None) -> dict:
    """Write the TorchScript artifact of a model file (FP32 or QAT/PTQ) to `out`; returns its metadata."""
    from gaq_calc.loading import load_model
    from gaq_calc.model.serialization import read_model_file

    model_path = Path(model_path)
    raw = read_model_file(model_path)
    model, meta = load_model(model_path, dtype=torch.float32)
    model = _swap_packed(model).eval()
    model._forward_pre_hooks.clear()  # training-only hooks (Degree-Quant's degree recorder)
    with warnings.catch_warnings():  # torch 2.13 flags TorchScript as deprecated; it still runs
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(EnergyForces(model))
    metadata = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "cutoff": float(model.cutoff),
        "species": [int(z) for z in model.atomic_numbers.tolist()],
        "dtype": "float32",
        "reference_energies_eV": [float(e) for e in model.reference_energies.tolist()],
        "conservative_reference_energies_eV": ([float(e) for e in model.conservative_reference_energies.tolist()]
                                               if hasattr(model, "conservative_reference_energies") else None),
        "ptq": bool(meta.get("ptq")),
        "model_config": raw["model_config"],
        "quantization": raw.get("quant_config"),
        "quant_preset": meta.get("ptq_preset") or (meta.get("train_config") or {}).get("quant"),
        "modes": list(MODES) if raw.get("quant_config") else ["fp32"],
        "source_file": str(model_path),
        "source_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "train_data": meta.get("train_data"),
        "torch": torch.__version__,
        **(extra or {}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(metadata)})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return metadata


def is_artifact(path: str | Path) -> bool:
    """True for a TorchScript archive (torch.save files are zip archives too, without code/)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_artifact(path: str | Path, device: str | torch.device = "cpu"):
    """(scripted EnergyForces, metadata) of an artifact; clear errors for anything else."""
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():  # torch 2.13 flags TorchScript as deprecated; it still runs
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        metadata = json.loads(extra[METADATA_FILE] or "{}")
    except Exception as err:
        raise ModelFileError(f"{path} is not a readable gaq_calc artifact ({type(err).__name__}: {err})") from err
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise ModelFileError(f"{path} is a TorchScript file but not a gaq_calc artifact (no metadata record)")
    if metadata.get("format_version") != ARTIFACT_VERSION:
        raise ModelFileError(f"{path}: unsupported artifact version {metadata.get('format_version')}")
    with torch.inference_mode(False), torch.no_grad():  # dequantize once, as ordinary tensors
        for _, sub in module.named_modules():
            if hasattr(sub, "round_activations"):
                sub.dequantized_weight()
    return module.eval(), metadata


def set_mode(module, mode: str) -> None:
    """"quantized": activations rounded as in QAT (forces are the straight-through gradient).
    "conservative": activations not rounded, weights quantized: forces are exact gradients."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    for _, sub in module.named_modules():
        if hasattr(sub, "round_activations"):
            sub.round_activations = mode == "quantized"
    potential = module.potential
    if hasattr(potential, f"{mode}_reference_energies"):  # each mode's fitted reference energies
        with torch.no_grad():
            potential.reference_energies.copy_(getattr(potential, f"{mode}_reference_energies"))
