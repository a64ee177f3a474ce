"""Training the dipole head (gaq_calc.model.dipole) on QM9's |mu| (debye): a small loop, FP32 only.

Loss: MSE of |mu| in debye. AdamW with linear warm-up and cosine decay per epoch, an EMA of the
weights (validated and saved), seeded batch order, validation carved (seeded) from the training
molecules as in the energy trainer. No checkpoint/resume and no QAT: this is the optional part of
issue 16, kept apart from the energy trainer. Files: a dict of tensors and plain data
(format "gaq_calc.dipole"), loaded with weights_only=True.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gaq_calc.data import GraphDataset, train_val_split
from gaq_calc.data.frames import Frames
from gaq_calc.model.config import ModelConfig
from gaq_calc.model.dipole import DipoleModel
from gaq_calc.model.serialization import atomic_save
from gaq_calc.train.ema import EMA
from gaq_calc.train.schedule import cosine_lr

DIPOLE_FORMAT = "gaq_calc.dipole"


def _labels(frames: Frames) -> np.ndarray:
    mu = (frames.properties or {}).get("mu_debye")
    if mu is None or not np.isfinite(mu).all():
        raise ValueError("dipole training needs finite properties['mu_debye'] on every frame (QM9 sources)")
    return mu


def dipole_mae(model: DipoleModel, dataset: GraphDataset, batch_size: int = 32) -> float:
    """MAE of |mu| in debye over a dataset."""
    dtype = next(model.parameters()).dtype
    mu = _labels(dataset.frames)
    pred = []
    with torch.no_grad():
        for batch in dataset.batches(batch_size):
            pred.append(model.dipole_debye(batch.to("cpu", dtype)).double().numpy())
    return float(np.mean(np.abs(np.concatenate(pred) - mu)))


def save_dipole_model(path: str | Path, model: DipoleModel, metadata: dict | None = None) -> None:
    atomic_save(
        {
            "format": DIPOLE_FORMAT,
            "model_config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metadata": metadata or {},
        },
        path,
    )


def load_dipole_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[DipoleModel, dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != DIPOLE_FORMAT:
        raise ValueError(f"{path}: not a gaq_calc dipole model file")
    model = DipoleModel(ModelConfig.from_dict(data["model_config"]))
    model.load_state_dict(data["state_dict"])
    return model.to(dtype).eval(), data["metadata"]


def train_dipole(
    frames: Frames,
    config: ModelConfig,
    out: str | Path | None = None,
    n_val: int = 20,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-3,
    min_lr: float = 1e-6,
    warmup_epochs: int = 1,
    ema_decay: float = 0.99,
    grad_clip: float = 10.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[DipoleModel, list[dict]]:
    """Train on frames' |mu| (QM9's "train" split: never pass test molecules); returns the EMA model
    with the best validation MAE and the history. `out`: folder for best.pt (optional)."""
    _labels(frames)
    train_idx, val_idx = train_val_split(len(frames), n_val, seed)
    config.species = frames.species
    train_ds = GraphDataset(frames.subset(train_idx), config.species, config.cutoff)
    val_ds = GraphDataset(frames.subset(val_idx), config.species, config.cutoff)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DipoleModel(config)
    ema = EMA(model, ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    mu_train = torch.from_numpy(_labels(train_ds.frames))
    history, best, best_state = [], math.inf, None
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs)
        model.train()
        order = np.random.default_rng(seed * 1_000_003 + epoch).permutation(len(train_ds))
        losses = []
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = train_ds.collate(index).to("cpu", torch.float32)
            loss = ((model.dipole_debye(batch) - mu_train[index].float()) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            ema.update(model)
            losses.append(loss.item())
        val = dipole_mae(ema.model, val_ds)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_mu_mae_debye": val})
        log(f"epoch {epoch + 1}: loss {history[-1]['train_loss']:.3e} | val |mu| MAE {val:.3f} D")
        if val < best:
            best = val
            best_state = {k: v.clone() for k, v in ema.model.state_dict().items()}
    model = DipoleModel(config)
    model.load_state_dict(best_state)
    model.eval()
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_dipole_model(
            Path(out) / "best.pt",
            model,
            {"history": history, "n_train": len(train_ds), "n_val": len(val_ds), "best_val_mu_mae_debye": best},
        )
    return model, history
