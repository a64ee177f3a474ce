"""scripts/heating_vs_act_bits.py (issue 12: NVE heating against the activation step) on a tiny W4A8 model:
one resumable NVE run per bit width on the fused kernel, the table written after each."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import calibrated_qat, load_script

from gaq_calc.model.serialization import save_model

REPO = Path(__file__).resolve().parents[1]


def frames(out: Path) -> dict:
    """Step and total energy of every saved frame of every run under out."""
    from gaq_calc.md import read_trajectory

    data = {}
    for path in sorted(out.glob("*/trajectory.h5")):
        d, _ = read_trajectory(path, names=("step", "total_energy"))
        data[path.parent.name] = np.stack([d["step"], d["total_energy"]])
    return data


@pytest.fixture(scope="module")
def study():
    return load_script(REPO / "scripts" / "heating_vs_act_bits.py", "heating_vs_act_bits")


def test_heating_study_runs_each_bit_width_and_resumes(tmp_path, ethanol_frames, study):
    model = tmp_path / "w4a8" / "model.pt"
    save_model(model, calibrated_qat(ethanol_frames, "w4a8_frame"), {"train_data": "ethanol"})
    out = tmp_path / "heating"
    argv = ["--model", str(model), "--structure", "ethanol", "--bits", "10", "6", "conservative",
            "--time-ps", "0.02", "--equilibrate-ps", "0.005", "--log-every", "2", "--threads", "1",
            "--bond-tolerance", "10", "--max-temperature", "1e6", "--no-progress", "--out", str(out)]  # fmt: skip
    assert study.main(argv) == 0
    result = json.loads((out / "heating.json").read_text())
    assert [r["activations"] for r in result["rows"]] == ["A10", "A6", "not rounded (conservative mode)"]
    assert all(r["status"] == "completed" and r["simulated_ps"] == pytest.approx(0.02) for r in result["rows"])
    assert result["rows"][0]["step_vs_own"] == pytest.approx(127 / 511) and result["own_act_bits"] == 8
    for name, bits, mode in (("A10", 10, "quantized"), ("A6", 6, "quantized"), ("conservative", None, "conservative")):
        summary = json.loads((out / name / "summary.json").read_text())
        assert (summary["act_bits"], summary["mode"], summary["kernel"]) == (bits, mode, "fused")
    assert (out / "heating.md").read_text().count("\n") == 5 and (out / "heating.png").stat().st_size > 0
    from gaq_calc.cli.report import heating_table

    block = heating_table(out)  # what gaq-report copies into README
    assert (
        block.startswith("`python scripts/heating_vs_act_bits.py --model ") and "| A10 | 0.249 | completed |" in block
    )
    assert block.endswith(f"({out / 'heating.png'})") and heating_table(tmp_path) == "(not run yet)"
    before = frames(out)
    assert study.main(argv) == 0  # every run completed: nothing runs again, every frame stays as it was
    after = frames(out)
    assert after.keys() == before.keys() and len(after) == 3
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert json.loads((out / "heating.json").read_text())["rows"] == result["rows"]


def test_heating_study_refuses_bad_bits_before_loading(tmp_path, study, capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["--model", "nowhere.pt", "--bits", "10", "1", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "--bits takes integers in [2, 16]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
