"""Learning-rate schedules as pure functions of the epoch, so a resumed run recomputes them exactly."""

import math


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` epochs, then cosine decay to min_lr at `total`."""
    if warmup > 0 and epoch < warmup:
        return lr * (epoch + 1) / warmup
    progress = min(1.0, (epoch - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def step_cosine_lr(t: float, lr: float, min_lr: float, warmup: float, total: float) -> float:
    """Per-step schedule at fractional epoch `t` (epoch + step / steps_per_epoch): linear warm-up from 0
    over `warmup` epochs, then cosine decay toward min_lr at `total` (the last step, at
    t = total - 1/steps_per_epoch, runs just above it).
    Short runs (QM9 on a CPU budget) need it: the per-epoch `cosine_lr` of a 4-epoch run never anneals."""
    if warmup > 0 and t < warmup:
        return lr * max(t, 1e-3 * warmup) / warmup
    progress = min(1.0, (t - warmup) / max(1e-9, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
