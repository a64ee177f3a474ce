"""scripts/lee_flips.py: the float32 LEE of rounded activations, split by quantizer group and precision."""

import json
from pathlib import Path

import pytest
from helpers import calibrated_qat, load_script

from gaq_calc.cli.report import lee_flips_table
from gaq_calc.model.serialization import save_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lee_flips.py"


def _load():
    return load_script(SCRIPT, "lee_flips")


def test_lee_flips_rows_and_report_table(tmp_path, ethanol_frames):
    path = tmp_path / "model.pt"
    save_model(path, calibrated_qat(ethanol_frames, "w4a8_frame"), {"train_data": "ethanol"})
    out = tmp_path / "flips" / "tiny"
    _load().main(["--model", str(path), "--data", "ethanol", "--frames", "3", "--rotations", "2", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert len(rows) == 8
    for r in rows.values():
        assert 0 <= r["median"] <= r["max"] and r["lee_mean"] <= r["max"] and 0 <= r["no_flip_share"] <= 1
    # unrounded: float32 noise only; float64 network: float64 noise, rounding or not
    assert rows["none rounded (conservative)"]["max"] < 0.02
    assert rows["all rounded, network in float64"]["max"] < 1e-6
    on = {label: int(r["rounded"].split(" of ")[0]) for label, r in rows.items()}
    assert on["only scalar-branch rounding"] + on["only l=1 frame rounding"] == on["all rounded (the card's LEE)"]
    assert on["none rounded (conservative)"] == 0 and on["only l=1 frame rounding"] > 0
    table = lee_flips_table(out.parent)
    assert table.startswith("**tiny**") and table.count("\n|") == 10  # header, rule, 8 rows
    assert lee_flips_table(tmp_path / "none") == "(not run yet)"


@pytest.mark.parametrize(
    "preset, message",
    [("w4_weights_only", "no activation quantizers"), ("naive_int8", "not rounded in the local frame")],
)
def test_lee_flips_refuses_models_it_cannot_split(tmp_path, ethanol_frames, preset, message):
    path = tmp_path / "model.pt"
    save_model(path, calibrated_qat(ethanol_frames, preset), {"train_data": "ethanol"})
    with pytest.raises(SystemExit, match=message):
        _load().main(["--model", str(path), "--data", "ethanol", "--frames", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()
