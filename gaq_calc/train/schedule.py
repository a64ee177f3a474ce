"""Learning-rate schedules as pure functions of the epoch, so a resumed run recomputes them exactly."""

import math


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` epochs, then cosine decay to min_lr at `total`."""
    if warmup > 0 and epoch < warmup:
        return lr * (epoch + 1) / warmup
    progress = min(1.0, (epoch - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
