"""gaq-eval: test-set metrics of a model, written as its model card (JSON).

gaq-eval azobenzene_fp32                      # shipped model on its molecule's split-01 test set
gaq-eval runs/x/best.pt --data ethanol        # any model file, any dataset
gaq-eval models/NAME --snapshot models/NAME/snapshot_40min.pt --write-card   # writes models/NAME/card.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from gaq_calc.cli import command_line, one_line_errors
from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.export import artifact_metadata, is_artifact
from gaq_calc.io import write_text_atomic
from gaq_calc.loading import load_energy_forces
from gaq_calc.metrics import error_metrics, local_equivariance_error
from gaq_calc.model import GAQPotential, ModelConfig
from gaq_calc.model.serialization import read_model_file
from gaq_calc.models_dir import resolve_model
from gaq_calc.quant import MODES, storage_bytes


def _quantization(config: dict | None, metadata: dict) -> dict | None:
    """What the card says about quantization: the config, the preset, and PTQ or QAT."""
    if not config:
        return None
    train_config = metadata.get("train_config") or {}
    preset = (
        metadata.get("quant_preset")
        or metadata.get("ptq_preset")
        or (train_config.get("quant") if isinstance(train_config, dict) else None)
    )
    return {"preset": preset, "mode": "PTQ" if metadata.get("ptq") else "QAT", "config": config}


def _load(path: Path, dtype: torch.dtype, mode: str | None):
    """(energy model for energy_and_forces, metadata, quant config or None) of a checkpoint or artifact, on
    the eager reference path. An artifact is rebuilt from its tensors and metadata: none of its code runs."""
    loaded = load_energy_forces(path, dtype, mode=mode, kernel="eager")
    return loaded.potential, loaded.metadata, loaded.quant_config


def evaluate_file(
    path: Path,
    data: str,
    split: str,
    dtype: torch.dtype,
    lee_frames: int = 0,
    lee_rotations: int = 4,
    mode: str | None = None,
) -> tuple[dict, dict, object, dict | None]:
    """(metrics, metadata, model, quant config or None)."""
    model, metadata, config = _load(path, dtype, mode)
    frames = read_frames(data, split)
    species = [int(z) for z in model.atomic_numbers.tolist()]
    dataset = GraphDataset(frames, species, float(model.cutoff))
    metrics = error_metrics(model, dataset)
    if lee_frames > 0:
        subset = GraphDataset(frames.subset(range(min(lee_frames, len(frames)))), species, float(model.cutoff))
        metrics.update(local_equivariance_error(model, subset, n_rotations=lee_rotations, seed=0))
        if dtype != torch.float64 and not is_artifact(path):
            # the same network evaluated in float64: separates symmetry breaking by the method from
            # float32 rounding (which flips rounding decisions of quantized activations)
            model64, _, _ = _load(path, torch.float64, mode)
            lee64 = local_equivariance_error(model64, subset, n_rotations=lee_rotations, seed=0)
            metrics["lee_float64_meV_per_A"] = lee64["lee_meV_per_A"]
    return metrics, metadata, model, config


@one_line_errors("gaq-eval")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="gaq-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="shipped model name, model folder, gaq-train run folder (best.pt) or model file")
    parser.add_argument("--data", help="molecule name or data file (default: the model's training molecule)")
    parser.add_argument("--split", default="test", help="split of a shipped molecule (default test)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--snapshot", help="model file saved after N minutes of training, evaluated too")
    parser.add_argument("--card", help="write the model card (JSON) to this file")
    parser.add_argument("--write-card", action="store_true", help="write card.json beside the model file")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lee-frames", type=int, default=100, help="first N frames for LEE (0: skip LEE)")
    parser.add_argument("--lee-rotations", type=int, default=4, help="random rotations per frame for LEE")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="quantized models: round activations (quantized, the default here) or not (conservative: exact forces)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    path = resolve_model(args.model)
    t0 = time.perf_counter()
    meta = artifact_metadata(path) if is_artifact(path) else read_model_file(path).get("metadata", {})
    data = args.data
    if data is None:
        trained_on = str(meta.get("train_data", ""))
        if not trained_on or Path(trained_on).suffix or "/" in trained_on:
            # a training *file* has no separate test split: never evaluate on training frames by default
            parser.error("pass --data: the model was not trained on a shipped molecule with a test split")
        data = trained_on
    metrics, metadata, model, config = evaluate_file(
        path, data, args.split, dtype, args.lee_frames, args.lee_rotations, args.mode
    )
    artifact = is_artifact(path)
    card = {
        "model": path.parent.name if path.name == "model.pt" else path.stem,
        "model_file": str(path),
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "test_data": str(data),
        "split": args.split,
        "precision": "fp32" if dtype == torch.float32 else "fp64",
        **metrics,
        "n_parameters": (
            GAQPotential(ModelConfig.from_dict(metadata["model_config"])).num_parameters()
            if artifact
            else model.num_parameters()
        ),
        "quantization": _quantization(config, metadata),
        "mode": (args.mode or "quantized") if config else None,
        "artifact": artifact,
        "size": {"file_bytes": path.stat().st_size, **({} if artifact else storage_bytes(model))},
        "model_config": metadata["model_config"] if artifact else model.config.to_dict(),
        # per-element reference energy shifts fitted on training frames (gaq-quantize --references)
        "reference_fit": {
            "quantized_shift_eV": metadata.get("quantized_reference_shift_eV"),
            # relative to the quantized mode's references as they were when it was fitted (which include
            # quantized_shift_eV); files from before the quantized refit: relative to the FP32 references
            "conservative_shift_eV": metadata.get("conservative_reference_shift_eV"),
            "frames": metadata.get("conservative_reference_frames"),
        },
        "training": {
            "commands": metadata.get("commands", []),
            # best.pt records the epoch it was selected at and, once the run finished, the run's totals
            "epochs": metadata.get("epochs_total", metadata.get("epochs")),
            "selected_epoch": metadata.get("selected_epoch"),
            "train_minutes": round(
                metadata.get("train_seconds_total", metadata.get("train_seconds", float("nan"))) / 60, 2
            ),
            # process CPU time of the training epochs (all threads); absent from models trained before it was kept
            "cpu_hours": (
                round(metadata.get("train_cpu_seconds_total", metadata["train_cpu_seconds"]) / 3600, 6)
                if "train_cpu_seconds" in metadata
                else None
            ),
            "n_train": metadata.get("n_train"),
            "n_val": metadata.get("n_val"),
            "config": metadata.get("train_config"),
        },
    }
    if args.snapshot:
        snap, snap_meta, _, _ = evaluate_file(Path(args.snapshot), data, args.split, dtype, mode=args.mode)
        card["snapshot"] = {
            "file": str(args.snapshot),
            "train_minutes": round(snap_meta.get("train_seconds", float("nan")) / 60, 2),
            "epochs": snap_meta.get("epochs"),
            "energy_mae_meV": snap["energy_mae_meV"],
            **({"force_mae_meV_per_A": snap["force_mae_meV_per_A"]} if "force_mae_meV_per_A" in snap else {}),
        }
    card["eval_command"] = command_line("gaq-eval", argv)
    card["eval_seconds"] = round(time.perf_counter() - t0, 1)
    card["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }

    # energy-only test data (QM9) have no force metrics
    f_txt = lambda m: f", F MAE {m['force_mae_meV_per_A']:.2f} meV/Å" if "force_mae_meV_per_A" in m else ""
    print(
        f"{card['model']} on {data} ({args.split}, {metrics['n_frames']} frames): "
        f"E MAE {metrics['energy_mae_meV']:.2f} meV"
        + f_txt(metrics)
        + (f", LEE {metrics['lee_meV_per_A']:.2e} meV/Å" if "lee_meV_per_A" in metrics else "")
    )
    if "snapshot" in card:
        s = card["snapshot"]
        print(f"  after {s['train_minutes']} min of training: E MAE {s['energy_mae_meV']:.2f} meV" + f_txt(s))
    target = Path(args.card) if args.card else (path.parent / "card.json" if args.write_card else None)
    if target is not None:
        write_text_atomic(target, json.dumps(card, indent=1) + "\n")
        print(f"card written: {target}")


if __name__ == "__main__":
    main()
