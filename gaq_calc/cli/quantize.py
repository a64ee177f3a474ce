"""gaq-quantize: post-training quantization (PTQ) of a trained model under a preset.

    gaq-quantize azobenzene_fp32 --preset naive_int8 -o models/azobenzene_naive_int8/model.pt

Activation ranges are calibrated by min-max over training frames (never test frames); weights are
quantized as they are, with no training. The output is a model file that gaq-eval and GAQCalculator read.
"""
from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.loading import load_model
from gaq_calc.model import energy_and_forces
from gaq_calc.model.serialization import read_model_file, save_model
from gaq_calc.models_dir import resolve_model
from gaq_calc.quant import PRESETS, calibrate, prepare, preset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="gaq-quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="FP32 model: shipped name, folder or file")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("-o", "--out", required=True, help="output model file")
    parser.add_argument("--calib-frames", type=int, default=100, help="training frames for calibration")
    parser.add_argument("--data", help="calibration data (default: the model's training molecule, train split)")
    args = parser.parse_args(argv)

    path = resolve_model(args.model)
    if read_model_file(path).get("quant_config"):
        parser.error(f"{path} is already quantized; start from an FP32 model")
    model, meta = load_model(path)
    data = args.data or meta.get("train_data")
    frames = read_frames(data, "train")
    index = np.random.default_rng(0).permutation(len(frames))[: args.calib_frames]
    dataset = GraphDataset(frames.subset(np.sort(index)), [int(z) for z in model.atomic_numbers], model.cutoff)
    quantized = prepare(model, preset(args.preset))
    calibrate(quantized, (b.to("cpu", torch.float32) for b in dataset.batches(16)), energy_and_forces)
    command = "gaq-quantize " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    save_model(args.out, quantized.eval(), {
        **meta, "commands": list(meta.get("commands", [])) + [command], "ptq": True, "ptq_preset": args.preset,
        "ptq_source": str(path), "calib_frames": len(dataset),
    })
    print(f"{args.preset} PTQ of {path} -> {args.out}")


if __name__ == "__main__":
    main()
