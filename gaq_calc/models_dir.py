"""Where shipped models live, and how a model name resolves to a file."""

from __future__ import annotations

import os
from pathlib import Path

from gaq_calc.model.serialization import ModelFileError

#: The repository's models/ folder; override with the GAQ_MODELS_DIR environment variable.
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def models_dir() -> Path:
    return Path(os.environ.get("GAQ_MODELS_DIR", MODELS_DIR))


def available_models() -> list[str]:
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / "model.pt").is_file()) if root.is_dir() else []


def resolve_model(model: str | os.PathLike) -> Path:
    """A file path, a model folder (holding model.pt), a gaq-train run folder (holding best.pt, the
    selected weights), or the name of a shipped model."""
    path = Path(model)
    candidates = [path, path / "model.pt", path / "best.pt", models_dir() / path, models_dir() / path / "model.pt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelFileError(
        f"no model file for {str(model)!r}: not a file, a folder with model.pt, a gaq-train run folder with "
        f"best.pt, or a shipped model (shipped in {models_dir()}: {available_models()})"
    )
