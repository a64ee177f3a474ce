"""gaq-train: train a model from a YAML file and/or flags; rerun the same command to resume."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

import torch

from gaq_calc.cli import command_line, one_line_errors
from gaq_calc.model.config import ModelConfig
from gaq_calc.train import TrainConfig, train


def _add_dataclass_flags(parser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in ("model", "species"):
            continue
        kind = hints[f.name]
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        parser.add_argument(
            "--" + f"{prefix}{f.name}".replace("_", "-"),
            dest=f"{prefix}{f.name}",
            type=base,
            default=None,
            help=f"(default {f.default!r})",
        )


def parse_config(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="gaq-train", description=__doc__)
    parser.add_argument("--config", help="YAML file with TrainConfig fields (a 'model:' section for the network)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for this process")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in out_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dataclass_flags(parser, TrainConfig)
    _add_dataclass_flags(parser, ModelConfig, prefix="model_")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    for f in fields(ModelConfig):
        value = getattr(args, f"model_{f.name}", None)
        if value is not None:
            setattr(cfg.model, f.name, value)
    return cfg, args


@one_line_errors("gaq-train")
def main(argv=None) -> None:
    cfg, args = parse_config(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # an application may set this; the library never does
    command = command_line("gaq-train", argv)
    out = train(cfg, command=command, resume=not args.no_resume, progress=not args.no_progress)
    print(f"done: {out}")


if __name__ == "__main__":
    main()
