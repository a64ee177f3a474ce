"""gaq-eval and gaq-report end to end on a tiny model file."""

import json

import pytest

from gaq_calc.cli import evaluate, report


def test_gaq_eval_writes_a_card(tmp_path, tiny_model_file, capsys):
    card = tmp_path / "card.json"
    evaluate.main([str(tiny_model_file), "--card", str(card), "--lee-frames", "3", "--lee-rotations", "2"])
    data = json.loads(card.read_text())
    assert data["n_frames"] == 1000 and data["split"] == "test" and data["test_data"] == "ethanol"
    assert data["energy_mae_meV"] > 0 and data["force_mae_meV_per_A"] > 0
    assert data["lee_frames"] == 3 and data["lee_rotations"] == 2
    assert data["lee_meV_per_A"] < 1e-2  # FP32 in float32: rounding noise only
    assert "E MAE" in capsys.readouterr().out


def test_gaq_eval_refuses_to_default_to_a_training_file(tmp_path, tiny_model_file, capsys):
    from gaq_calc.model.serialization import read_model_file, write_model_file

    data = read_model_file(tiny_model_file)
    data["metadata"]["train_data"] = "/some/where/train.extxyz"
    path = tmp_path / "m.pt"
    write_model_file(path, data)  # a valid file (fresh integrity hash) trained on a file
    with pytest.raises(SystemExit):
        evaluate.main([str(path)])
    assert "pass --data" in capsys.readouterr().err


def test_gaq_report_rewrites_only_the_generated_block(tmp_path, monkeypatch):
    models = tmp_path / "models" / "m1"
    models.mkdir(parents=True)
    (models / "card.json").write_text(
        json.dumps(
            {
                "model": "m1",
                "test_data": "data/rmd17/rmd17_ethanol_test_01.npz",
                "split": "test",
                "n_frames": 1000,
                "energy_mae_meV": 1.234,
                "force_mae_meV_per_A": 5.678,
                "n_parameters": 1000,
                "training": {"epochs": 10, "selected_epoch": 9, "train_minutes": 3.0},
            }
        )
    )
    base = tmp_path / "results" / "quant_baselines" / "lsq_w4a8"
    base.mkdir(parents=True)
    config = {
        "scalar_weight_bits": 8,
        "vector_weight_bits": 4,
        "scalar_act_bits": 8,
        "vector_act_bits": 8,
        "vector_method": "cartesian",
    }
    (base / "card.json").write_text(
        json.dumps(
            {
                "model": "best",
                "test_data": "azobenzene",
                "split": "test",
                "n_frames": 1000,
                "energy_mae_meV": 9.87,
                "force_mae_meV_per_A": 6.54,
                "lee_meV_per_A": 3.21,
                "n_parameters": 1000,
                "quantization": {"preset": "lsq_w4a8", "mode": "QAT", "config": config},
                "size": {"packed_bytes": 2048},
                "training": {"epochs": 12},
            }
        )
    )
    (base / "log.csv").write_text("epoch,val_energy_mae_meV,val_force_mae_meV_per_A\n1,20,9\n2,10,7\n")
    monkeypatch.setenv("GAQ_MODELS_DIR", str(tmp_path / "models"))
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- results:start -->\nold\n<!-- results:end -->\nmid\n"
        "<!-- quant:start -->\n<!-- quant:end -->\n<!-- md:start -->\n<!-- md:end -->\n"
        "<!-- speed:start -->\n<!-- speed:end -->\nend\n"
    )
    report.main(["--readme", str(readme), "--results", str(tmp_path / "results")])
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmid\n" in text and text.endswith("end\n")
    assert "| m1 |" in text and "1.23" in text and "5.68" in text and "old" not in text
    assert "| lsq_w4a8 | lsq_w4a8 | QAT | quantized | W4/8 A8/8 | cartesian | 9.87 | 6.54 | 3.21 |" in text
    rows = json.loads((tmp_path / "results" / "quant_table.json").read_text())
    assert rows[0]["converged"] == "yes" and rows[0]["epochs"] == 12
    assert (tmp_path / "results" / "quant_table.md").read_text().strip() in text


def test_gaq_quantize_ptq_round_trip(tmp_path, tiny_model_file):
    from gaq_calc.cli import quantize
    from gaq_calc.loading import load_model
    from gaq_calc.quant import QuantLinear

    out = tmp_path / "naive" / "model.pt"
    quantize.main([str(tiny_model_file), "--preset", "naive_int8", "-o", str(out), "--calib-frames", "8"])
    model, meta = load_model(out)
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert q and all(bool(m.act_quantizer.calibrated) for m in q)
    steps = q[0].weight_quantizer.step_size().detach().flatten()
    assert (steps == steps[0]).all()  # naive: one step per tensor
    assert meta["ptq"] and meta["commands"][-1].startswith("gaq-quantize")
    card = tmp_path / "card.json"
    evaluate.main([str(out), "--card", str(card), "--lee-frames", "2", "--lee-rotations", "2"])
    data = json.loads(card.read_text())
    assert data["lee_frames"] == 2 and "lee_meV_per_A" in data  # LEE values: test_train
    with pytest.raises(SystemExit):  # an already quantized model is refused
        quantize.main([str(out), "--preset", "w4a8", "-o", str(tmp_path / "again.pt")])
