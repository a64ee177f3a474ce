"""The QM9 table of gaq-report: U0 models (models/qm9_*/card*.json) on QM9's held-out test molecules.

A planned model without a card gets a "not trained yet" row: no number is ever made up.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

#: The issue-16 models, in table order; other qm9_* cards follow them.
QM9_MODELS = ("qm9_u0_fp32", "qm9_u0_w8a8", "qm9_u0_w4a8")
MARKERS = ("<!-- qm9:start -->", "<!-- qm9:end -->")
HEADER = [
    "| model | method | inference | bits W(vec/scal) A(scal/vec) | test molecules | E MAE (meV) | E MAE / FP32 | "
    "LEE fp32 (meV/Å) | LEE fp64 (meV/Å) | converged | epochs | packed size (KiB) | FP32 / this size | CPU hours |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def qm9_cards(models: Path) -> list[tuple[str, dict, Path]]:
    """(model name, card, model folder) of every card under models/qm9_*/, planned models first."""
    cards = []
    for path in sorted(models.glob("qm9_*/card*.json")):
        cards.append((path.parent.name, json.loads(path.read_text()), path.parent))
    # the model file's card (quantized mode) before its artifact's (conservative mode)
    return sorted(cards, key=lambda c: (*_order(c[0]), bool(c[1].get("artifact"))))


def qm9_table(models: Path) -> str:
    from gaq_calc.cli.report import _bits, _converged, packed_bytes

    cards = qm9_cards(models)
    fp32 = next((c for name, c, _ in cards if name == "qm9_u0_fp32" and not c.get("quantization")), None)
    fp_bytes = packed_bytes(fp32) if fp32 else None
    fmt = lambda x, f: "–" if x is None else format(x, f)
    rows = list(HEADER)
    planned = [(name, None, None) for name in QM9_MODELS if not any(n == name for n, _, _ in cards)]
    for name, card, folder in sorted(cards + planned, key=lambda c: _order(c[0])):  # stable: cards keep their order
        if card is None:
            rows.append(f"| {name} | – | – | – | – | not trained yet | – | – | – | – | – | – | – | – |")
            continue
        q = card.get("quantization") or {}
        conservative = card.get("mode") == "conservative"
        size = packed_bytes(card)
        training = card.get("training") or {}
        converged = _converged(folder / "log.csv", column="val_energy_mae_meV")
        rows.append(
            f"| {Path(card['model_file']).name if card.get('artifact') else name} | {q.get('preset') or 'fp32'} | "
            f"{card.get('mode') or ('quantized' if q else '–')} | "
            f"{_bits(card).split(' A')[0] + ' A unrounded' if conservative else _bits(card)} | "
            f"{card.get('n_frames')} | "
            f"{card['energy_mae_meV']:.2f} | "
            f"{fmt(fp32 and card['energy_mae_meV'] / fp32['energy_mae_meV'], '.2f')}{'x' if fp32 else ''} | "
            f"{fmt(card.get('lee_meV_per_A'), '.3g')} | "
            f"{fmt(card.get('lee_float64_meV_per_A'), '.1e')} | {converged} | {training.get('epochs') or '–'} | "
            f"{fmt(size and size / 1024, '.0f')} | "
            f"{fmt(fp_bytes / size if fp_bytes and size else None, '.2f')}{'x' if fp_bytes and size else ''} | "
            f"{fmt(training.get('cpu_hours'), '.1f')} |"
        )
    return "\n".join(rows) + qm9_learning_curves(models)


def qm9_learning_curves(models: Path) -> str:
    """Validation E MAE after every epoch of every shipped QM9 model (its log.csv), so the distance to a
    converged model is visible: the budgeted runs stop long before the curve flattens."""
    rows = []
    for name in sorted({p.parent.name for p in models.glob("qm9_*/log.csv")}, key=_order):
        with open(models / name / "log.csv") as fh:
            for r in csv.DictReader(fh):
                rows.append(
                    f"| {name} | {r['epoch']} | {float(r['lr']):.1e} | {float(r['train_minutes']):.0f} | "
                    f"{float(r['val_energy_mae_meV']):.2f} |"
                )
    if not rows:
        return ""
    head = [
        "",
        "",
        "Learning curves (`models/qm9_*/log.csv`): validation E MAE of the EMA weights after each epoch, on the "
        "10,000 validation molecules.",
        "",
        "| model | epoch | learning rate at its end | training minutes | val E MAE (meV) |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def _order(name: str) -> tuple:
    return (QM9_MODELS.index(name) if name in QM9_MODELS else len(QM9_MODELS), name)
