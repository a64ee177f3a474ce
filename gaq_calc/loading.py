"""Load any gaq_calc model file: FP32, or quantization-prepared (QAT) when the file records a quant config."""
from __future__ import annotations

from pathlib import Path

import torch

from gaq_calc.model import GAQPotential, ModelConfig
from gaq_calc.model.serialization import ModelFileError, read_model_file, upgrade_state_dict
from gaq_calc.quant import QuantConfig, prepare


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model in eval mode, metadata) from a model file; a quantized model is in its quantized mode."""
    data = read_model_file(path)
    try:
        model = GAQPotential(ModelConfig.from_dict(data["model_config"]))
        if data.get("quant_config"):
            model = prepare(model, QuantConfig(**data["quant_config"]))
        model.load_state_dict(upgrade_state_dict(model, data["state_dict"]))  # (older layouts renamed)
    except Exception as err:
        raise ModelFileError(f"{path}: model file does not match the network ({err})") from err
    return model.to(device=device, dtype=dtype).eval(), data.get("metadata", {})
