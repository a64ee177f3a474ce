"""FP32 training: energy + force loss, AdamW, warm-up + cosine/plateau LR, EMA, resumable checkpoints.

Resuming reproduces the uninterrupted run: batch order is a pure function of (seed, epoch), the LR a
pure function of the epoch (or of the saved plateau state), optimizer and EMA states are saved, and no
random numbers are drawn after the seeded initialisation. With `checkpoint_minutes` a checkpoint is also
written inside an epoch (long QM9 epochs); it records the batches done, and a resumed run skips them.

Energy-only data (`Frames.forces is None`, e.g. QM9) train on the energy term alone: the network's
energy is evaluated without its position gradient (no double backward), unless the LEE regularizer
asks for forces.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from gaq_calc.data import GraphDataset, fit_reference_energies, read_frames, train_val_split
from gaq_calc.io import atomic_path, write_text_atomic
from gaq_calc.metrics import error_metrics, force_rms, random_rotations, residual_energy_scale, rotated
from gaq_calc.model import GAQPotential, ModelConfig, energy_and_forces
from gaq_calc.model import energy as graph_energy
from gaq_calc.model.serialization import (
    load_checkpoint_file,
    read_model_file,
    save_checkpoint_file,
    save_model,
    upgrade_state_dict,
    write_model_file,
)
from gaq_calc.models_dir import resolve_model
from gaq_calc.train.config import TrainConfig
from gaq_calc.train.ema import EMA
from gaq_calc.train.schedule import cosine_lr, step_cosine_lr

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
FINAL = "final.pt"
SNAPSHOT = "snapshot_{minutes:g}min.pt"


def loss_fn(energy, forces, batch, cfg: TrainConfig) -> torch.Tensor:
    n_atoms = batch.n_atoms_per_graph.to(energy.dtype)
    e_term = (((energy - batch.energy) / n_atoms) ** 2).mean()
    if batch.forces is None:  # energy-only data
        return cfg.energy_weight * e_term.to(batch.positions.dtype)
    f_term = ((forces - batch.forces) ** 2).mean()
    return cfg.energy_weight * e_term.to(forces.dtype) + cfg.force_weight * f_term


def distilled_targets(frames, cfg: TrainConfig):
    """The training frames with targets mixed from a teacher model's predictions and the DFT labels."""
    from dataclasses import replace

    from gaq_calc.loading import load_model
    from gaq_calc.metrics import predict

    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise ValueError(f"distill_weight must lie in [0, 1], not {cfg.distill_weight}")
    teacher, _ = load_model(resolve_model(cfg.distill_from), dtype=torch.float64)
    species = [int(z) for z in teacher.atomic_numbers.tolist()]
    energies, forces = predict(teacher, GraphDataset(frames, species, teacher.cutoff), batch_size=32)
    w = cfg.distill_weight
    return replace(
        frames,
        energies=w * energies + (1 - w) * frames.energies,
        forces=None if forces is None else [w * f + (1 - w) * t for f, t in zip(forces, frames.forces)],
    )


def build_model(cfg: TrainConfig, train_frames, calibration_batches) -> GAQPotential:
    """FP32: a seeded fresh network with fitted references. QAT: the FP32 model, prepared and calibrated."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.init_from:
        from gaq_calc.loading import load_model

        model, _ = load_model(resolve_model(cfg.init_from), dtype=dtype)
        model.train()
    else:
        with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
            torch.manual_seed(cfg.seed)
            model = GAQPotential(cfg.model).to(dtype)
        ref = fit_reference_energies(train_frames, cfg.model.species)
        scale = (
            force_rms(train_frames.forces)
            if train_frames.has_forces
            else residual_energy_scale(train_frames, ref, cfg.model.species)
        )
        model.set_energy_reference(ref, scale)
    if cfg.quant:
        from gaq_calc.quant import calibrate, prepare, preset

        model = prepare(model, preset(cfg.quant))
        calibrate(model, (b.to("cpu", dtype) for b in calibration_batches), energy_and_forces)
    return model


def lee_penalty(model, batch, forces, seed: int) -> torch.Tensor:
    """Mean over atoms of |F(Rx) - R F(x)| for one random rotation per step (eV/Å)."""
    rot = random_rotations(1, seed, dtype=forces.dtype)[0]
    _, forces_rot = energy_and_forces(model, rotated(batch, rot), training=True)
    return torch.linalg.norm(forces_rot - forces @ rot.T, dim=-1).mean()


def _write_log(out: Path, history: list[dict]) -> None:
    with atomic_path(out / "log.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_text_atomic(out / "log.json", json.dumps(history, indent=1))


def plot_learning_curves(history: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    epochs = [h["epoch"] for h in history]
    with_forces = "val_force_mae_meV_per_A" in history[0]  # absent for energy-only data
    fig = Figure(figsize=(13 if with_forces else 9, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if with_forces else 2)
    axes[0].semilogy(epochs, [h["train_loss"] for h in history], label="train")
    axes[0].semilogy(epochs, [h["val_loss"] for h in history], label="val (EMA)")
    axes[0].set_ylabel("loss")
    axes[1].semilogy(epochs, [h["val_energy_mae_meV"] for h in history])
    axes[1].set_ylabel("val energy MAE (meV)")
    if with_forces:
        axes[2].semilogy(epochs, [h["val_force_mae_meV_per_A"] for h in history])
        axes[2].set_ylabel("val force MAE (meV/Å)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=110)


#: parameters of QAT layers before issue 14 that the current layout does not have (unrounded layers' steps)
LEGACY_DEAD_PARAMETERS = (".act_log_step",)


def _upgrade_optimizer_state(model, saved_model_state: dict, optimizer_state: dict) -> dict:
    """The optimizer state of a checkpoint written with an older layout of the network: the entries of the
    parameters that still exist, in the current order. (Before issue 14, QAT layers whose inputs are not
    rounded had an unused activation step; it never had a gradient, so it never had optimizer state.)"""
    (group,) = optimizer_state["param_groups"]
    names = [name for name, _ in model.named_parameters()]
    if len(group["params"]) == len(names):
        return optimizer_state
    saved_name = upgrade_state_dict(model, {k: k for k in saved_model_state})  # current name -> saved name
    legacy = [saved_name[name] for name in names]
    order = [k for k in saved_model_state if k in set(legacy) or k.endswith(LEGACY_DEAD_PARAMETERS)]
    if len(order) != len(group["params"]):
        raise ValueError("the checkpoint's optimizer state does not match the network; use a new out_dir")
    index = {name: group["params"][i] for i, name in enumerate(order)}
    state = {j: optimizer_state["state"][index[name]] for j, name in enumerate(legacy)
             if index[name] in optimizer_state["state"]}  # fmt: skip
    return {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}


# fields that only say where and for how long a run goes; a resumed run may change them
RUN_CONTROL_FIELDS = ("out_dir", "max_minutes", "checkpoint_every", "checkpoint_minutes")


def _trajectory_fields(config: dict) -> dict:
    # through the dataclass, so fields added later (with defaults) compare equal to older checkpoints
    config = TrainConfig.from_dict(config).to_dict()
    return {k: v for k, v in config.items() if k not in RUN_CONTROL_FIELDS}


def _finalize_best(out: Path, totals: dict) -> None:
    """Record the run's totals (epochs, minutes) in best.pt beside the epoch it was selected at."""
    data = read_model_file(out / BEST)
    data["metadata"].update(totals)
    write_model_file(out / BEST, data)  # a fresh integrity hash over the updated metadata


def train(
    cfg: TrainConfig,
    command: str = "",
    resume: bool = True,
    progress: bool = True,
    stop_after_epochs: Optional[int] = None,
    log: Callable[[str], None] = print,
    stop_after_steps: Optional[int] = None,
) -> Path:
    """Train (or resume) into cfg.out_dir; returns the directory. `stop_after_epochs` ends this run early;
    `stop_after_steps` ends it inside an epoch after that many optimizer steps, with a checkpoint."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = read_frames(cfg.train_data, "train")
    train_idx, val_idx = train_val_split(len(frames), cfg.n_val, cfg.seed)
    train_frames, val_frames = frames.subset(train_idx), frames.subset(val_idx)
    if cfg.distill_from:
        train_frames = distilled_targets(train_frames, cfg)
    if cfg.init_from:  # fine-tuning keeps the network of the model it starts from
        cfg.model = ModelConfig.from_dict(read_model_file(resolve_model(cfg.init_from))["model_config"])
        missing = set(frames.species) - set(cfg.model.species)
        if missing:
            raise ValueError(f"{cfg.init_from} does not know elements {sorted(missing)} of the training data")
    else:
        cfg.model.species = frames.species  # the model knows exactly the elements it was trained on
    dtype = getattr(torch, cfg.dtype)
    train_ds = GraphDataset(train_frames, cfg.model.species, cfg.model.cutoff)
    val_ds = GraphDataset(val_frames, cfg.model.species, cfg.model.cutoff)
    mean_atoms = float(np.mean([len(n) for n in val_frames.numbers]))

    # QAT only: activation ranges from the first 64 training frames, in batches of 16
    calibration = (
        [train_ds.collate(np.arange(k, min(k + 16, len(train_ds)))) for k in range(0, min(64, len(train_ds)), 16)]
        if cfg.quant
        else []
    )
    model = build_model(cfg, train_frames, calibration)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {
        "epoch": 0,
        "train_seconds": 0.0,
        "history": [],
        "best_val_loss": math.inf,
        "plateau_lr": cfg.lr,
        "plateau_best": math.inf,
        "plateau_bad": 0,
        "snapshot_done": False,
        "commands": [],
        "train_cpu_seconds": 0.0,
        # inside an epoch (checkpoint_minutes): batches done, their losses, seconds spent
        "step": 0,
        "epoch_losses": [],
        "epoch_seconds": 0.0,
        "epoch_cpu_seconds": 0.0,
    }
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint_file(ckpt_path)
        if _trajectory_fields(ckpt["config"]) != _trajectory_fields(cfg.to_dict()):
            raise ValueError(f"{ckpt_path} was written with a different config; use a new out_dir")
        model.load_state_dict(upgrade_state_dict(model, ckpt["model"]))  # (checkpoints of an older layout)
        ema.model.load_state_dict(upgrade_state_dict(ema.model, ckpt["ema"]))
        optimizer.load_state_dict(_upgrade_optimizer_state(model, ckpt["model"], ckpt["optimizer"]))
        state = ckpt["state"]
        for key, value in (
            ("train_cpu_seconds", 0.0),
            ("step", 0),
            ("epoch_losses", []),
            ("epoch_seconds", 0.0),
            ("epoch_cpu_seconds", 0.0),
        ):
            state.setdefault(key, value)  # checkpoints written before these existed
        log(
            f"resumed from {ckpt_path} at epoch {state['epoch']}"
            + (f", step {state['step']}" if state["step"] else "")
            + f" ({(state['train_seconds'] + state['epoch_seconds']) / 60:.1f} min trained)"
        )
    state["commands"].append(command)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def save_checkpoint() -> None:
        save_checkpoint_file(
            {
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "ema": ema.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state,
            },
            ckpt_path,
        )

    def metadata() -> dict:
        return {
            "train_data": str(cfg.train_data),
            "n_train": len(train_frames),
            "n_val": len(val_frames),
            "epochs": state["epoch"],
            "train_seconds": state["train_seconds"],
            "train_cpu_seconds": state["train_cpu_seconds"],
            "commands": list(state["commands"]),
            "train_config": cfg.to_dict(),
            "torch_version": str(torch.__version__),
        }

    run_start = time.perf_counter()
    epochs_this_run = steps_this_run = 0
    energy_only = not train_frames.has_forces
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        # a resumed mid-epoch checkpoint: its time counts toward this epoch
        t0 = time.perf_counter() - state["epoch_seconds"]
        c0 = time.process_time() - state["epoch_cpu_seconds"]
        if cfg.schedule == "cosine":
            lr = cosine_lr(epoch, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        elif cfg.schedule == "cosine_steps":  # set again before every step below
            lr = step_cosine_lr(epoch, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        elif cfg.schedule == "plateau":
            lr = state["plateau_lr"] * min(1.0, (epoch + 1) / max(1, cfg.warmup_epochs))
        else:
            raise ValueError(f"unknown schedule {cfg.schedule!r}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.quant:  # staged warm-up: the vector branch is quantized only after the warm-up epochs
            from gaq_calc.quant import set_vector_quantization

            for m in (model, ema.model):
                set_vector_quantization(m, epoch >= cfg.quant_warmup_epochs)
            if epoch == cfg.quant_warmup_epochs > 0:  # selection only among fully quantized epochs
                state["best_val_loss"], state["plateau_best"] = math.inf, math.inf
        model.train()
        first = state["step"]
        losses = list(state["epoch_losses"])
        batches = train_ds.batches(cfg.batch_size, shuffle_seed=cfg.seed * 1_000_003 + epoch, first=first)
        n_batches = math.ceil(len(train_ds) / cfg.batch_size)
        last_save = time.perf_counter()
        stopped_inside = False
        for step, batch in enumerate(
            tqdm(
                batches,
                total=n_batches,
                initial=first,
                disable=not progress,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
            ),
            start=first,
        ):
            batch = batch.to("cpu", dtype)
            if cfg.schedule == "cosine_steps":
                lr = step_cosine_lr(epoch + step / n_batches, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            if energy_only and cfg.lee_weight <= 0:  # no force labels: the energy alone, no double backward
                energy, forces = graph_energy(model, batch), None
            else:
                energy, forces = energy_and_forces(model, batch, training=True)
            loss = loss_fn(energy, forces, batch, cfg)
            if cfg.lee_weight > 0:
                loss = loss + cfg.lee_weight * lee_penalty(
                    model, batch, forces, seed=cfg.seed * 1_000_003 + epoch * 10_007 + step
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update(model)
            losses.append(loss.item())
            steps_this_run += 1
            now = time.perf_counter()
            out_of_time = cfg.max_minutes is not None and (now - run_start) / 60 >= cfg.max_minutes
            stop_now = (stop_after_steps is not None and steps_this_run >= stop_after_steps) or (
                out_of_time and cfg.checkpoint_minutes is not None
            )
            due = cfg.checkpoint_minutes is not None and (now - last_save) / 60 >= cfg.checkpoint_minutes
            if step + 1 < n_batches and (stop_now or due):
                state.update(
                    step=step + 1,
                    epoch_losses=list(losses),
                    epoch_seconds=now - t0,
                    epoch_cpu_seconds=time.process_time() - c0,
                )
                save_checkpoint()
                last_save = time.perf_counter()
                if stop_now:
                    stopped_inside = True
                    break
        if stopped_inside:
            log(f"stopped inside epoch {epoch + 1} after step {state['step']}/{n_batches}; rerun to resume")
            break
        if not np.isfinite(losses).all():
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}; lower the learning rate")

        val = error_metrics(ema.model, val_ds)
        # model selection on the validation frames only, same weighting as the training loss
        # (plain floats only: checkpoints must load with weights_only=True, which refuses numpy scalars)
        val_loss = float(
            cfg.energy_weight * (val["energy_rmse_meV"] / 1000 / mean_atoms) ** 2
            + (cfg.force_weight * (val["force_rmse_meV_per_A"] / 1000) ** 2 if "force_rmse_meV_per_A" in val else 0.0)
        )
        state["epoch"] = epoch + 1
        state["train_seconds"] += time.perf_counter() - t0
        state["train_cpu_seconds"] += time.process_time() - c0
        state.update(step=0, epoch_losses=[], epoch_seconds=0.0, epoch_cpu_seconds=0.0)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_energy_mae_meV": val["energy_mae_meV"],
            **({"val_force_mae_meV_per_A": val["force_mae_meV_per_A"]} if "force_mae_meV_per_A" in val else {}),
            "train_minutes": state["train_seconds"] / 60,
        }
        state["history"].append(row)
        if cfg.schedule == "plateau":
            if val_loss < state["plateau_best"]:
                state["plateau_best"], state["plateau_bad"] = val_loss, 0
            else:
                state["plateau_bad"] += 1
                if state["plateau_bad"] > cfg.plateau_patience:
                    state["plateau_lr"] = max(cfg.min_lr, state["plateau_lr"] * cfg.plateau_factor)
                    state["plateau_bad"] = 0
        if val_loss < state["best_val_loss"]:
            state["best_val_loss"] = val_loss
            save_model(out / BEST, ema.model, {**metadata(), "selected_epoch": epoch + 1, "val": val})
        if not state["snapshot_done"] and state["train_seconds"] >= cfg.snapshot_minutes * 60:
            state["snapshot_done"] = True
            save_model(
                out / SNAPSHOT.format(minutes=cfg.snapshot_minutes),
                ema.model,
                {**metadata(), "snapshot_minutes": cfg.snapshot_minutes, "val": val},
            )
        force_txt = f" F {val['force_mae_meV_per_A']:.2f} meV/A" if "force_mae_meV_per_A" in val else ""
        log(
            f"epoch {epoch + 1}: lr {lr:.2e} loss {row['train_loss']:.3e} | val E {val['energy_mae_meV']:.2f} meV"
            f"{force_txt} | {state['train_seconds'] / 60:.1f} min"
        )
        epochs_this_run += 1
        last = state["epoch"] >= cfg.epochs
        out_of_time = cfg.max_minutes is not None and (time.perf_counter() - run_start) / 60 >= cfg.max_minutes
        stop = (
            last
            or out_of_time
            or (stop_after_epochs is not None and epochs_this_run >= stop_after_epochs)
            or (stop_after_steps is not None and steps_this_run >= stop_after_steps)
        )
        if stop or state["epoch"] % cfg.checkpoint_every == 0:
            save_checkpoint()
            _write_log(out, state["history"])
            plot_learning_curves(state["history"], out / "learning_curves.png")
        if stop:
            break
    if state["epoch"] >= cfg.epochs:
        save_model(out / FINAL, ema.model, metadata())
        _finalize_best(
            out,
            {
                "epochs_total": state["epoch"],
                "train_seconds_total": state["train_seconds"],
                "train_cpu_seconds_total": state["train_cpu_seconds"],
            },
        )
    return out
