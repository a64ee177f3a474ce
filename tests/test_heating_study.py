"""scripts/heating_vs_act_bits.py (issue 12: NVE heating against the activation step) on a tiny W4A8 model:
one resumable NVE run per bit width on the fused kernel, every check before the first write, the table of
every run in the folder written after each."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import calibrated_qat, load_script

from gaq_calc.model.serialization import save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return load_script(REPO / "scripts" / "heating_vs_act_bits.py", "heating_vs_act_bits")


@pytest.fixture(scope="module")
def models(tmp_path_factory, ethanol_frames):
    """Two tiny W4A8 (frame) QAT checkpoints that differ in their calibration."""
    root = tmp_path_factory.mktemp("heating_models")
    paths = []
    for name, calibration in (("a", (0, 3, 4, 5)), ("b", (1, 2))):
        path = root / name / "model.pt"
        save_model(path, calibrated_qat(ethanol_frames, "w4a8_frame", calibration), {"train_data": "ethanol"})
        paths.append(path)
    return paths


def argv(model, out, *bits, dtype="float32"):
    return ["--model", str(model), "--structure", "ethanol", "--bits", *bits, "--time-ps", "0.02",
            "--equilibrate-ps", "0.005", "--log-every", "2", "--threads", "1", "--dtype", dtype,
            "--bond-tolerance", "10", "--max-temperature", "1e6", "--no-progress", "--out", str(out)]  # fmt: skip


def frames(out: Path) -> dict:
    """Step and total energy of every saved frame of every run under out."""
    from gaq_calc.md import read_trajectory

    data = {}
    for path in sorted(out.glob("*/trajectory.h5")):
        d, _ = read_trajectory(path, names=("step", "total_energy"))
        data[path.parent.name] = np.stack([d["step"], d["total_energy"]])
    return data


def files(out: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_heating_study_runs_each_bit_width_and_resumes(tmp_path, models, study):
    from gaq_calc.cli.report import heating_table

    out = tmp_path / "heating"
    assert study.main(argv(models[0], out, "10", "6")) == 0
    assert study.main(argv(models[0], out, "conservative")) == 0  # a later call adds its run to the table
    result = json.loads((out / "heating.json").read_text())
    assert [r["activations"] for r in result["rows"]] == ["A6", "A10", "not rounded (conservative mode)"]
    assert all(r["status"] == "completed" and r["simulated_ps"] == pytest.approx(0.02) for r in result["rows"])
    assert result["rows"][1]["step_vs_own"] == pytest.approx(127 / 511) and result["own_act_bits"] == 8
    for name, bits, mode in (("A10", 10, "quantized"), ("A6", 6, "quantized"), ("conservative", None, "conservative")):
        summary = json.loads((out / name / "summary.json").read_text())
        assert (summary["act_bits"], summary["mode"], summary["kernel"]) == (bits, mode, "fused")
        assert summary["model_path"] == str(models[0])
    table = [line for line in (out / "heating.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 5 and (out / "heating.png").stat().st_size > 0
    block = heating_table(out)  # what gaq-report copies into README
    assert (
        block.startswith("`python scripts/heating_vs_act_bits.py --model ") and "| A10 | 0.249 | completed |" in block
    )
    assert block.endswith(f"({out / 'heating.png'})") and heating_table(tmp_path) == "(not run yet)"
    before = frames(out)
    assert study.main(argv(models[0], out, "10", "6", "conservative")) == 0  # all completed: nothing runs again
    after = frames(out)
    assert after.keys() == before.keys() and len(after) == 3
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert json.loads((out / "heating.json").read_text())["rows"] == result["rows"]


def test_heating_study_refuses_before_anything_is_written(tmp_path, models, study, capsys):
    out = tmp_path / "heating"
    assert study.main(argv(models[0], out, "6", "16")) == 2  # A16's sums are not exact in float32
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bits 16" in err and "--dtype float64" in err and not out.exists()
    for bits, message in ((["10", "10"], "twice"), (["١٠"], "integers in [2, 16]"), (["1"], "integers in [2, 16]")):
        assert study.main(argv(models[0], out, *bits)) == 2
        assert message in capsys.readouterr().err and not out.exists()
    assert study.main(argv(REPO / "models" / "azobenzene_fp32.pt", out, "10")) == 2  # nothing to round
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantized" in err and not out.exists()
    assert study.main(argv(models[0], out, "10")) == 0
    saved = files(out)
    assert study.main(argv(models[1], out, "10")) == 2  # another model into the same folder
    assert "table of another model" in capsys.readouterr().err and files(out) == saved
    (out / "heating.json").unlink()
    saved = files(out)
    assert study.main(argv(models[1], out, "10", "8")) == 2  # the restart check itself, before A8 starts
    assert "different model setup" in capsys.readouterr().err and files(out) == saved


def test_heating_study_runs_in_the_dtype_it_records(tmp_path, models, study):
    out = tmp_path / "heating"
    assert study.main(argv(models[0], out, "16", dtype="float64")) == 0  # exact in float64
    summary = json.loads((out / "A16" / "summary.json").read_text())
    assert summary["dtype"] == "float64" and summary["status"] == "completed"
    base = study.load_base(str(models[0]), "float64")
    assert (
        study.calculator_at(base, "16", "float64").dtype == study.calculator_at(base, "conservative", "float64").dtype
    )
    import torch

    assert study.calculator_at(base, "16", "float64").dtype == torch.float64


def test_power_law_fit_recovers_the_exponent_and_skips_unresolved_drifts(study):
    def row(bits, drift, stderr):
        ratio = 127 / (2 ** (bits - 1) - 1)
        return {"act_bits": bits, "activations": f"A{bits}", "step_vs_own": ratio,
                "drift_meV_per_atom_per_ps": drift, "drift_stderr_meV_per_atom_per_ps": stderr}  # fmt: skip

    rows = [row(b, 0.12 * (127 / (2 ** (b - 1) - 1)) ** 2, 0.01) for b in (6, 7, 8)]
    rows += [row(10, -0.01, 0.01), row(9, 0.02, 0.01)]  # not resolved from zero at 3 standard errors: left out
    rows.append({**row(8, 0.0, 0.0), "act_bits": None, "activations": "conservative"})
    fit = study.power_law(rows)
    assert fit["rows_used"] == ["A6", "A7", "A8"]
    assert fit["exponent"] == pytest.approx(2.0, rel=1e-9) and fit["drift_at_own_step"] == pytest.approx(0.12)
    assert 0 < fit["exponent_stderr"] < 0.1
    assert study.power_law(rows[:1] + rows[3:]) is None  # one resolved row: no fit
    text = study.markdown({"own_act_bits": 8, "rows": [], "fit": fit})
    assert "Fit over A6, A7, A8" in text and "p = 2.00 ±" in text
