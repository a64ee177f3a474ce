"""Training: config, loop, EMA, schedules, checkpoint/resume."""

from gaq_calc.train.config import TrainConfig
from gaq_calc.train.loop import train

__all__ = ["TrainConfig", "train"]
