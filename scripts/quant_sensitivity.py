"""Where does the error of rounded activations come from? Per-layer sensitivity of a QAT model.

Starts from the model in conservative mode (quantized weights, activations not rounded) and measures,
on test frames, the energy and force errors when the activations of
  - one Linear layer at a time are rounded ("only"),
  - every layer but one are rounded ("all but"),
  - groups of layers (by role: radial, attention, values, exchange, vector mix, readout) are rounded,
  - every layer is rounded at A8, A10, A12, A16 with the same clipping range (finer steps).
Energies use the conservative-mode reference energies; "E MAE (offset removed)" subtracts the mean
error first, so it shows the frame-to-frame noise that no reference energy can fix.

    python scripts/quant_sensitivity.py --model models/azobenzene_w4a8/model.pt --frames 200 \
        --out results/quant_sensitivity/azobenzene_w4a8
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.io import write_text_atomic
from gaq_calc.loading import load_model
from gaq_calc.metrics import predict
from gaq_calc.quant import ActKind, QuantLinear, set_mode
from gaq_calc.quant.api import round_at_bits
from gaq_calc.units import MEV_PER_EV

GROUPS = {
    "radial filters": ("radial.",),
    "query/key": ("qk_proj",),
    "values": ("value_proj",),
    "exchange in": ("exchange_in",),
    "exchange out": ("exchange_out",),
    "vector mix (l=1)": ("vector_mix",),
    "readout": ("readout.",),
}


def errors(model, dataset) -> dict:
    energies, forces = predict(model, dataset, batch_size=25)
    de = (energies - dataset.frames.energies) * MEV_PER_EV
    df = np.concatenate([p - t for p, t in zip(forces, dataset.frames.forces)]) * MEV_PER_EV
    return {
        "e_mae": float(np.abs(de).mean()),
        "e_mae_offset_removed": float(np.abs(de - de.mean()).mean()),
        "e_mean_error": float(de.mean()),
        "f_mae": float(np.abs(df).mean()),
    }


def rounding(layers: dict, on: set, bits: int = 8) -> None:
    """Round the activations of the layers named in `on` at `bits`, keeping each layer's clipping range."""
    for name, layer in layers.items():
        q = layer.act_quantizer
        if q.kind == ActKind.NONE:
            continue
        q.enabled = name in on
        round_at_bits(q, bits)  # same range (levels x step) with more levels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/azobenzene_w4a8/model.pt")
    parser.add_argument("--data", default="azobenzene")
    parser.add_argument("--frames", type=int, default=200, help="first N test frames")
    parser.add_argument("--out", default="results/quant_sensitivity/azobenzene_w4a8")
    args = parser.parse_args(argv)

    model, _ = load_model(args.model, torch.float32)
    set_mode(model, "conservative")
    frames = read_frames(args.data, "test")
    frames = frames.subset(np.arange(min(args.frames, len(frames))))
    dataset = GraphDataset(frames, [int(z) for z in model.atomic_numbers.tolist()], model.cutoff)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    names = [n for n, m in layers.items() if m.act_quantizer.kind != ActKind.NONE]
    rows = []
    start = time.perf_counter()

    def measure(kind, label, on, bits=8):
        rounding(layers, set(on), bits)
        row = {
            "kind": kind,
            "label": label,
            "rounded_layers": len(on),
            "act_bits": bits if on else None,
            **errors(model, dataset),
        }
        rows.append(row)
        print(
            f"{kind:10s} {label:32s} E {row['e_mae']:7.2f} (offset-free {row['e_mae_offset_removed']:6.2f}) "
            f"F {row['f_mae']:6.2f}",
            flush=True,
        )

    measure("baseline", "conservative (none rounded)", [])
    for bits in (8, 10, 12, 16):
        measure("bits", f"all layers A{bits}", names, bits)
    for group, keys in GROUPS.items():
        members = [n for n in names if any(k in n for k in keys)]
        measure("group only", group, members)
        measure("group off", f"all but {group}", [n for n in names if n not in members])
    worst = [n for n in names if any(k in n for k in GROUPS["radial filters"] + GROUPS["readout"])]
    measure("group off", "all but radial filters and readout", [n for n in names if n not in worst])
    for name in names:
        measure("only", name, [name])
    for name in names:
        measure("all but", name, [n for n in names if n != name])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "frames": len(frames),
        "torch": torch.__version__,
        "command": shlex.join(
            ["python", "scripts/quant_sensitivity.py", *(s for k, v in vars(args).items() for s in (f"--{k}", str(v)))]
        ),
        "cpu_minutes": (time.perf_counter() - start) / 60,
        "rows": rows,
    }
    for suffix, text in ((".json", json.dumps(record, indent=1)), (".md", to_markdown(record))):
        write_text_atomic(out.with_suffix(suffix), text)


def to_markdown(record: dict) -> str:
    lines = [
        f"`{record['command']}` ({record['frames']} test frames, energies with the conservative-mode "
        "reference energies):",
        "",
        "| rounded activations | layers | bits | E MAE (meV) | E MAE, offset removed (meV) | mean E error (meV) "
        "| F MAE (meV/Å) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        label = (
            r["label"] if r["kind"] in ("baseline", "bits", "group only", "group off") else f"{r['kind']} {r['label']}"
        )
        lines.append(
            f"| {label} | {r['rounded_layers']} | {'A' + str(r['act_bits']) if r['act_bits'] else '–'} | "
            f"{r['e_mae']:.2f} | "
            f"{r['e_mae_offset_removed']:.2f} | {r['e_mean_error']:+.2f} | {r['f_mae']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
