"""gaq-export: write the deployable TorchScript artifact of a model (FP32, W8A8 or W4A8).

    gaq-export models/azobenzene_w4a8 -o models/azobenzene_w4a8.pt

The artifact holds the network with packed integer weights (two 4-bit codes per byte, int8 for 8-bit
layers) and per-channel steps, and a metadata record: cutoff, species, dtype, quantization scheme,
reference energies, and the metrics of the model card found beside the checkpoint (card.json).
It loads with torch.jit.load without the training code; GAQCalculator("azobenzene_w4a8.pt") runs it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gaq_calc.cli import command_line, one_line_errors
from gaq_calc.export import export_artifact
from gaq_calc.models_dir import resolve_model

CARD_KEYS = (
    "test_data",
    "split",
    "n_frames",
    "energy_mae_meV",
    "force_mae_meV_per_A",
    "lee_meV_per_A",
    "lee_float64_meV_per_A",
    "lee_frames",
    "lee_rotations",
    "eval_command",
    "model_sha256",
)


@one_line_errors("gaq-export")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="gaq-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="model checkpoint: shipped name, folder or file")
    parser.add_argument("-o", "--out", required=True, help="artifact file to write (.pt)")
    parser.add_argument(
        "--card",
        help="model card whose metrics go into the metadata (default: card.json beside the checkpoint, if any)",
    )
    args = parser.parse_args(argv)
    path = resolve_model(args.model)
    card_path = Path(args.card) if args.card else path.parent / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    extra = {"export_command": command_line("gaq-export", argv)}
    if card is not None:
        extra["card"] = {k: card[k] for k in CARD_KEYS if k in card}
        extra["card"]["file"] = str(card_path)
    meta = export_artifact(path, args.out, extra)
    size = Path(args.out).stat().st_size
    print(
        f"{path} -> {args.out} ({size / 1024:.0f} KiB, quantization: "
        f"{'none (FP32)' if not meta['quantization'] else meta['quantization']['vector_method']})"
    )


if __name__ == "__main__":
    main()
