"""Load any gaq_calc model file: FP32, or quantization-prepared (QAT) when the file records a quant config."""
from __future__ import annotations

from pathlib import Path

import torch

from gaq_calc.model import GAQPotential, ModelConfig
from gaq_calc.model.serialization import ModelFileError, read_model_file
from gaq_calc.quant import QuantConfig, prepare, set_quant_mode


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model in eval mode, metadata) from a model file."""
    data = read_model_file(path)
    try:
        model = GAQPotential(ModelConfig.from_dict(data["model_config"]))
        state = data["state_dict"]
        if data.get("quant_config"):
            model = prepare(model, QuantConfig(**data["quant_config"]))
            # files written before per-mode reference energies existed: both modes use the FP32 ones
            state = dict(state)
            for key in ("quantized_reference_energies", "conservative_reference_energies"):
                state.setdefault(key, state["reference_energies"])
        model.load_state_dict(state)
        if data.get("quant_config"):
            set_quant_mode(model, "quantized")
    except Exception as err:
        raise ModelFileError(f"{path}: model file does not match the network ({err})") from err
    return model.to(device=device, dtype=dtype).eval(), data.get("metadata", {})
