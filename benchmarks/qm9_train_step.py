"""Time QM9 training steps (energy-only, the trainer's step) and extrapolate to one epoch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qm9_train_step.py --config configs/qm9_u0_fp32.yaml \
        --steps 50 --json benchmarks/results/qm9_train_step.json

Builds the network of the config, fits its references on the QM9 training molecules, then runs the
trainer's optimizer step (energy forward, backward, clip, AdamW, EMA) on batches of the first
shuffled epoch. Reports wall and process CPU seconds per step: on a shared machine the CPU time is the
better estimate of a dedicated core's wall time. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

from gaq_calc.data import GraphDataset, read_frames, train_val_split
from gaq_calc.io import write_text_atomic
from gaq_calc.train import TrainConfig
from gaq_calc.train.ema import EMA
from gaq_calc.train.loop import build_model, loss_fn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/qm9_u0_fp32.yaml")
    parser.add_argument("--data", help="override train_data (e.g. qm9_subset)")
    parser.add_argument("--batch-size", type=int, help="override batch_size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_yaml(args.config)
    if args.data:
        cfg.train_data = args.data
    if args.batch_size:
        cfg.batch_size = args.batch_size

    t0 = time.perf_counter()
    frames = read_frames(cfg.train_data, "train")
    train_idx, _ = train_val_split(len(frames), cfg.n_val, cfg.seed)
    train_frames = frames.subset(train_idx)
    cfg.model.species = frames.species
    ds = GraphDataset(train_frames, cfg.model.species, cfg.model.cutoff)
    setup_seconds = time.perf_counter() - t0
    model = build_model(cfg, train_frames, [])
    dtype = getattr(torch, cfg.dtype)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    wall, cpu, atoms, edges = [], [], [], []
    batches = ds.batches(cfg.batch_size, shuffle_seed=cfg.seed * 1_000_003)
    for k in range(args.warmup + args.steps):
        batch = next(batches).to("cpu", dtype)
        w0, c0 = time.perf_counter(), time.process_time()
        energy = model(
            batch.species, batch.positions, batch.receivers, batch.senders, batch.shifts, batch.batch, batch.n_graphs
        )
        loss = loss_fn(energy, None, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(model)
        loss.item()
        if k >= args.warmup:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
            atoms.append(len(batch.species))
            edges.append(len(batch.receivers))
    n_batches = math.ceil(len(ds) / cfg.batch_size)
    result = {
        "command": shlex.join(["benchmarks/qm9_train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "train_data": cfg.train_data,
        "n_train": len(ds),
        "batch_size": cfg.batch_size,
        "n_batches": n_batches,
        "num_features": cfg.model.num_features,
        "num_layers": cfg.model.num_layers,
        "steps_timed": args.steps,
        "mean_atoms_per_batch": float(np.mean(atoms)),
        "mean_edges_per_batch": float(np.mean(edges)),
        "wall_s_per_step_mean": float(np.mean(wall)),
        "wall_s_per_step_median": float(np.median(wall)),
        "cpu_s_per_step_mean": float(np.mean(cpu)),
        "epoch_hours_from_wall": float(np.mean(wall)) * n_batches / 3600,
        "epoch_hours_from_cpu": float(np.mean(cpu)) * n_batches / 3600,
        "data_setup_seconds": setup_seconds,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
