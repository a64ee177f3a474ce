"""Model files: tensors and plain data only, loaded with weights_only=True (no arbitrary unpickling)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from gaq_calc.model.network import GAQPotential

MODEL_FORMAT = "gaq_calc.model"
MODEL_FORMAT_VERSION = 1


class ModelFileError(RuntimeError):
    """A model file that is missing, corrupt, or not a gaq_calc model."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(path: str | Path, model: GAQPotential, metadata: dict | None = None) -> None:
    """Config, weights and metadata; a quantization-prepared model also records its quant config."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    data = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "state_dict": state,
        "metadata": metadata or {},
    }
    quant_config = getattr(model, "quant_config", None)
    if quant_config is not None:
        data["quant_config"] = quant_config.to_dict()
    atomic_save(data, path)


def read_model_file(path: str | Path) -> dict:
    """The raw contents of a model file, validated; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelFileError(f"{path} is not a readable gaq_calc model file ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a gaq_calc model file (no '{MODEL_FORMAT}' header)")
    if data.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported model format version {data.get('format_version')}")
    return data
