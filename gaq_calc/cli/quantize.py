"""gaq-quantize: post-training quantization (PTQ) of a trained model under a preset.

    gaq-quantize azobenzene_fp32 --preset naive_int8 -o models/azobenzene_naive_int8/model.pt

Activation ranges are calibrated by min-max over training frames (never test frames); weights are
quantized as they are, with no training. The output is a model file that gaq-eval and GAQCalculator read.
Every quantized output also gets its conservative-mode reference energies, fitted on the same frames.

    gaq-quantize models/azobenzene_w4a8 --conservative-reference -o models/azobenzene_w4a8/model.pt

fits only the conservative mode's per-element reference energies of an already quantized (QAT) model
on training frames (quant.fit_conservative_reference), leaving everything else as it is.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gaq_calc.cli import command_line, one_line_errors
from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.loading import load_model
from gaq_calc.model import energy_and_forces
from gaq_calc.model.serialization import read_model_file, save_model
from gaq_calc.models_dir import resolve_model
from gaq_calc.quant import PRESETS, calibrate, fit_conservative_reference, prepare, preset


@one_line_errors("gaq-quantize")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="gaq-quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="FP32 model: shipped name, folder or file")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="PTQ preset (an FP32 input needs one)")
    parser.add_argument(
        "--conservative-reference",
        action="store_true",
        help="quantized input: only fit the conservative mode's reference energies",
    )
    parser.add_argument("-o", "--out", required=True, help="output model file")
    parser.add_argument("--calib-frames", type=int, default=100, help="training frames for calibration")
    parser.add_argument("--data", help="calibration data (default: the model's training molecule, train split)")
    args = parser.parse_args(argv)

    path = resolve_model(args.model)
    already = bool(read_model_file(path).get("quant_config"))
    if already and not args.conservative_reference:
        parser.error(f"{path} is already quantized; start from an FP32 model (or pass --conservative-reference)")
    if not already and not args.preset:
        parser.error("an FP32 model needs --preset")
    model, meta = load_model(path)
    data = args.data or meta.get("train_data")
    frames = read_frames(data, "train")
    index = np.random.default_rng(0).permutation(len(frames))[: args.calib_frames]
    dataset = GraphDataset(frames.subset(np.sort(index)), [int(z) for z in model.atomic_numbers], model.cutoff)
    batches = [b.to("cpu", torch.float32) for b in dataset.batches(16)]
    command = command_line("gaq-quantize", argv)
    if already:
        quantized, extra = model, {}
    else:
        quantized = calibrate(prepare(model, preset(args.preset)), batches, energy_and_forces)
        extra = {"ptq": True, "ptq_preset": args.preset, "ptq_source": str(path), "calib_frames": len(dataset)}
    correction = fit_conservative_reference(quantized, batches, lambda m, b: energy_and_forces(m, b)[0])
    save_model(
        args.out,
        quantized.eval(),
        {
            **meta,
            "commands": list(meta.get("commands", [])) + [command],
            **extra,
            "conservative_reference_shift_eV": [float(c) for c in correction],
            "conservative_reference_frames": len(dataset),
        },
    )
    shift = ", ".join(f"Z={z}: {1000 * float(c):+.1f}" for z, c in zip(model.atomic_numbers.tolist(), correction))
    print(
        f"{args.preset or 'QAT model'}: {path} -> {args.out}; conservative-mode reference energy "
        f"corrections (meV, fitted on {len(dataset)} training frames): {shift}"
    )


if __name__ == "__main__":
    main()
