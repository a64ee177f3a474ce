"""gaq-quantize: post-training quantization (PTQ) of a trained model under a preset.

    gaq-quantize azobenzene_fp32 --preset naive_int8 -o models/azobenzene_naive_int8/model.pt

Activation ranges are calibrated by min-max over training frames (never test frames); weights are
quantized as they are, with no training. The output is a model file that gaq-eval and GAQCalculator read.
Every quantized output also gets its conservative mode's reference energies fitted on the same frames
(bias correction, quant.fit_conservative_reference); with --references its quantized mode's too
(quant.fit_quantized_reference, fitted first: the conservative fit starts from them).

    gaq-quantize models/azobenzene_w4a8 --references -o models/azobenzene_w4a8/model.pt

refits only those per-element reference energies of an already quantized (QAT) model on training
frames, leaving everything else as it is (an exact energy shift per element: no force changes).
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
from gaq_calc.quant import PRESETS, calibrate, fit_conservative_reference, fit_quantized_reference, prepare, preset


@one_line_errors("gaq-quantize")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="gaq-quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="FP32 model: shipped name, folder or file")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="PTQ preset (an FP32 input needs one)")
    refit = parser.add_mutually_exclusive_group()
    refit.add_argument(
        "--references",
        action="store_true",
        help="refit the reference energies of both modes (bias correction on training frames); "
        "a quantized input: only that",
    )
    refit.add_argument(
        "--conservative-reference",
        action="store_true",
        help="quantized input: only refit the conservative mode's reference energies (the recipe before the "
        "quantized-mode fit existed)",
    )
    parser.add_argument("-o", "--out", required=True, help="output model file")
    parser.add_argument("--calib-frames", type=int, default=100, help="training frames for calibration")
    parser.add_argument("--data", help="calibration data (default: the model's training molecule, train split)")
    args = parser.parse_args(argv)

    path = resolve_model(args.model)
    already = bool(read_model_file(path).get("quant_config"))
    if already and not (args.references or args.conservative_reference):
        parser.error(f"{path} is already quantized; start from an FP32 model (or pass --references)")
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
    energy = lambda m, b: energy_and_forces(m, b)[0]
    quantized_shift = torch.zeros_like(quantized.reference_energies)
    if args.references:  # opt-in, so that rerunning an older PTQ baseline reproduces it
        quantized_shift = fit_quantized_reference(quantized, batches, energy)  # first: the other's base
    correction = fit_conservative_reference(quantized, batches, energy)
    save_model(
        args.out,
        quantized.eval(),
        {
            **meta,
            "commands": list(meta.get("commands", [])) + [command],
            **extra,
            "quantized_reference_shift_eV": [
                float(c) + float(old)
                for c, old in zip(
                    quantized_shift, meta.get("quantized_reference_shift_eV") or [0.0] * len(quantized_shift)
                )
            ],
            "conservative_reference_shift_eV": [float(c) for c in correction],
            "conservative_reference_frames": len(dataset),
        },
    )
    z = model.atomic_numbers.tolist()
    shift = lambda c: ", ".join(f"Z={zi}: {1000 * float(ci):+.1f}" for zi, ci in zip(z, c))
    print(
        f"{args.preset or 'QAT model'}: {path} -> {args.out}; reference energy corrections (meV, fitted on "
        f"{len(dataset)} training frames): quantized mode {shift(quantized_shift)}; "
        f"conservative mode {shift(correction)}"
    )


if __name__ == "__main__":
    main()
