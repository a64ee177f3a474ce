"""Training hyperparameters; YAML files and CLI flags map onto this dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml

from gaq_calc.model.config import ModelConfig


@dataclass
class TrainConfig:
    train_data: str = "azobenzene"  # shipped molecule name or a file (rMD17 npz, extxyz, ...)
    out_dir: str = "runs/azobenzene_fp32"
    n_val: int = 50  # validation frames carved from the training file
    epochs: int = 300  # total planned epochs (the LR schedule spans them; runs may stop earlier and resume)
    batch_size: int = 8
    lr: float = 5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_epochs: float = 2  # whole epochs except with cosine_steps
    schedule: str = "cosine"  # cosine (per epoch) | cosine_steps (per step) | plateau
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    ema_decay: float = 0.99
    energy_weight: float = 1.0  # on the MSE of the energy per atom (eV^2)
    force_weight: float = 1.0  # on the MSE of force components (eV^2/Å^2)
    grad_clip: float = 10.0
    seed: int = 0
    dtype: str = "float32"
    checkpoint_every: int = 1  # epochs
    checkpoint_minutes: Optional[float] = None  # also checkpoint inside an epoch this often (long epochs, QM9)
    snapshot_minutes: float = 40.0  # save the EMA model once when training time first passes this
    max_minutes: Optional[float] = None  # stop (resumable) after this much wall time in this run
    # quantization-aware training (QAT): fine-tune a trained FP32 model under a quantization preset
    init_from: Optional[str] = None  # FP32 model to start from (file, folder or shipped name)
    quant: Optional[str] = None  # preset name (w4a8, w8a8, naive_int8, ...); None = FP32 training
    quant_warmup_epochs: int = 0  # epochs with the vector branch unquantized (staged warm-up)
    lee_weight: float = 0.0  # weight of the LEE regularizer (mean |F(Rx) - R F(x)|, eV/Å)
    # distillation: training targets become distill_weight x teacher + (1 - distill_weight) x DFT labels,
    # the teacher's energies and forces computed once at start; validation stays on the DFT labels
    distill_from: Optional[str] = None  # teacher model (file, folder or shipped name), e.g. the FP32 model
    distill_weight: float = 1.0
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        # the per-epoch schedules read warmup_epochs as whole epochs (cosine_lr: lr * (epoch + 1) / warmup
        # would run epoch 0 at 20x the peak for 0.05); only the per-step schedule takes a fraction
        if self.schedule != "cosine_steps" and float(self.warmup_epochs) != int(self.warmup_epochs):
            raise ValueError(
                f"warmup_epochs {self.warmup_epochs} is not a whole number of epochs; "
                "only schedule cosine_steps takes a fraction"
            )

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        model = data.pop("model", {}) or {}
        return cls(model=model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model), **data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh) or {})
