"""QM9 (issue 16) on the shipped subset: reader and units, the fixed split, energy-only training, gaq-eval,
and the calculator on a QM9 molecule."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.io import read
from helpers import randomize, tiny_config

from gaq_calc.data import GraphDataset, read_frames, train_val_split
from gaq_calc.data.qm9 import QM9_SPECIES, SUBSET_FILE, is_test_index, qm9_split, read_qm9
from gaq_calc.model.serialization import load_checkpoint_file
from gaq_calc.train import TrainConfig, train


@pytest.fixture(scope="module")
def subset():
    return read_qm9("qm9_subset", "all")


def test_subset_reader_converts_hartree_once(subset):
    raw = read(SUBSET_FILE, index=":")
    assert len(subset) == len(raw) >= 200
    k = 17
    assert subset.ids[k] == raw[k].info["qm9_index"]
    assert subset.energies[k] == raw[k].info["U0_hartree"] * units.Hartree  # hartree -> eV, exactly once
    assert subset.energies.min() > -1e5 and subset.energies.max() < -1e3  # eV scale (U0 of small molecules)
    np.testing.assert_array_equal(subset.numbers[k], raw[k].numbers)
    np.testing.assert_array_equal(subset.positions[k], raw[k].positions)
    assert subset.forces is None and not subset.has_forces  # energy-only data: no force labels at all
    assert subset.species == QM9_SPECIES  # H, C, N, O, F all occur


def test_csv_reader_in_qm9pack_layout(tmp_path, subset):
    """A CSV in qm9pack's layout (its first row is methane, U0 = -40.47893 hartree) reads like the subset."""
    path = tmp_path / "qm9_part.csv"
    header = ["XYZ_file", "Index", "SMILES", "Elements", "XYZ_Ang", "Dipole_debye", "InternalEnergy_0K_au"]
    methane = [
        "dsgdb9nsd_000001.xyz",
        "1",
        "C",
        "['C','H','H','H','H']",
        "[[-0.0126981359,1.0858041578,0.0080009958],[0.002150416,-0.0060313176,0.0019761204],"
        "[1.0117308433,1.4637511618,0.0002765748],[-0.540815069,1.4475266138,-0.8766437152],"
        "[-0.5238136345,1.4379326443,0.9063972942]]",
        "0.",
        "-40.47893",
    ]
    raw = read(SUBSET_FILE, index="3")
    symbols = "[" + ",".join(f"'{s}'" for s in raw.get_chemical_symbols()) + "]"
    xyz = "[" + ",".join("[" + ",".join(repr(float(x)) for x in p) + "]" for p in raw.positions) + "]"
    other = [
        f"dsgdb9nsd_{raw.info['qm9_index']:06d}.xyz",
        str(raw.info["qm9_index"]),
        "X",
        symbols,
        xyz,
        repr(float(raw.info["mu_debye"])),
        repr(float(raw.info["U0_hartree"])),
    ]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(header)
        writer.writerow(methane)
        writer.writerow(other)
    frames = read_frames(f"qm9:{path}", "all")
    assert list(frames.ids) == [1, raw.info["qm9_index"]]
    assert frames.energies[0] == pytest.approx(-40.47893 * 27.211386, rel=1e-6)
    assert frames.energies[0] == -40.47893 * units.Hartree
    np.testing.assert_array_equal(frames.numbers[0], [6, 1, 1, 1, 1])
    assert frames.positions[0][0, 1] == 1.0858041578
    np.testing.assert_array_equal(frames.positions[1], subset.positions[3])
    assert frames.energies[1] == subset.energies[3]
    assert len(read_frames(f"qm9:{path}", "test")) == 0 and len(read_frames(f"qm9:{path}", "train")) == 2


def test_unknown_split_and_source_are_errors():
    with pytest.raises(ValueError, match="split"):
        read_qm9("qm9_subset", "val")  # validation is carved from "train" by the trainer
    with pytest.raises(FileNotFoundError):
        read_frames("qm9:/no/such/file.extxyz")


def test_fixed_split_rule(subset):
    train_frames = read_frames("qm9_subset", "train")
    test_frames = read_frames("qm9_subset", "test")
    assert len(test_frames) > 0 and len(train_frames) + len(test_frames) == len(subset)
    assert np.all(test_frames.ids % 10 == 0)
    assert not np.any(train_frames.ids % 10 == 0)
    assert is_test_index([10, 20, 133880]).all() and not is_test_index([1, 9, 11, 133885]).any()

    # validation as the trainer carves it (train_val_split on the "train" split) is qm9_split's
    n_val, seed = 30, 0
    train_idx, val_idx = train_val_split(len(train_frames), n_val, seed)
    tr, va, te = qm9_split(subset.ids, n_val, seed)
    np.testing.assert_array_equal(train_frames.ids[val_idx], subset.ids[va])
    np.testing.assert_array_equal(train_frames.ids[train_idx], subset.ids[tr])
    np.testing.assert_array_equal(test_frames.ids, subset.ids[te])
    assert not (set(subset.ids[tr]) | set(subset.ids[va])) & set(subset.ids[te])
    assert not set(subset.ids[tr]) & set(subset.ids[va])
    assert len(tr) + len(va) + len(te) == len(subset)
    # deterministic: the same ids, n_val and seed give the same split
    for a, b in zip(qm9_split(subset.ids, n_val, seed), (tr, va, te)):
        np.testing.assert_array_equal(a, b)


def test_energy_only_batches_and_metrics(subset):
    from gaq_calc.metrics import error_metrics
    from gaq_calc.model import GAQPotential

    ds = GraphDataset(subset.subset(range(6)), QM9_SPECIES, 5.0)
    batch = ds.collate([0, 1, 2])
    assert batch.forces is None and batch.energy.dtype == torch.float64
    torch.manual_seed(0)
    model = GAQPotential(tiny_config(species=QM9_SPECIES)).double().eval()
    metrics = error_metrics(model, ds)
    assert metrics["n_frames"] == 6 and np.isfinite(metrics["energy_mae_meV"])
    assert not any(k.startswith("force") for k in metrics)


def _config(tmp_path, name, **kw) -> TrainConfig:
    cfg = TrainConfig(
        train_data="qm9_subset",
        out_dir=str(tmp_path / name),
        n_val=20,
        epochs=2,
        batch_size=16,
        lr=3e-3,
        warmup_epochs=1,
        ema_decay=0.9,
        snapshot_minutes=0.0,
        model=tiny_config(species=QM9_SPECIES, tau_init=2.0),
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few seconds on the subset's training molecules."""
    out = train(_config(tmp_path_factory.mktemp("qm9"), "run", epochs=3), progress=False, log=lambda s: None)
    return out


def test_energy_only_training_smoke(trained):
    history = json.loads((trained / "log.json").read_text())
    assert len(history) == 3 and all(np.isfinite(r["train_loss"]) for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "val_force_mae_meV_per_A" not in history[0]
    for name in ("best.pt", "final.pt", "checkpoint.pt", "log.csv", "learning_curves.png"):
        assert (trained / name).exists(), name
    meta = torch.load(trained / "best.pt", weights_only=True)["metadata"]
    assert meta["n_train"] + meta["n_val"] == len(read_frames("qm9_subset", "train"))
    assert meta["train_cpu_seconds_total"] > 0
    assert 0 < torch.load(trained / "best.pt", weights_only=True)["state_dict"]["energy_scale"] < 1.0  # eV


def test_gaq_eval_on_the_held_out_molecules(trained, tmp_path, capsys):
    from gaq_calc.cli import evaluate

    card = tmp_path / "card.json"
    evaluate.main([str(trained / "best.pt"), "--card", str(card), "--lee-frames", "2", "--lee-rotations", "1"])
    data = json.loads(card.read_text())
    assert data["test_data"] == "qm9_subset" and data["split"] == "test"
    assert data["n_frames"] == len(read_frames("qm9_subset", "test"))
    assert np.isfinite(data["energy_mae_meV"]) and "force_mae_meV_per_A" not in data
    assert data["lee_meV_per_A"] < 1e-2  # FP32 forces (the energy's gradient) stay equivariant
    assert data["training"]["cpu_hours"] > 0
    out = capsys.readouterr().out
    assert "E MAE" in out and "F MAE" not in out


def test_resume_inside_an_epoch_reproduces_the_uninterrupted_run(tmp_path):
    straight = train(_config(tmp_path, "straight"), progress=False, log=lambda s: None)
    train(_config(tmp_path, "stopped", checkpoint_minutes=0.0), progress=False, stop_after_steps=5, log=lambda s: None)
    state = load_checkpoint_file(tmp_path / "stopped" / "checkpoint.pt")["state"]
    assert (state["epoch"], state["step"], len(state["epoch_losses"])) == (0, 5, 5)
    train(
        _config(tmp_path, "stopped", checkpoint_minutes=0.0), progress=False, stop_after_steps=19, log=lambda s: None
    )  # across the epoch boundary (16 steps per epoch), stopped again inside epoch 2
    state = load_checkpoint_file(tmp_path / "stopped" / "checkpoint.pt")["state"]
    assert (state["epoch"], state["step"]) == (1, 8)
    resumed = train(_config(tmp_path, "stopped"), progress=False, log=lambda s: None)
    a = torch.load(straight / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "final.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    la = json.loads((straight / "log.json").read_text())
    lb = json.loads((resumed / "log.json").read_text())
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


def test_calculator_on_a_qm9_molecule(tmp_path, subset):
    """Energy in eV on the U0 scale and forces equal to -dE/dx (finite differences); nothing QM9-specific."""
    from ase.calculators.fd import calculate_numerical_forces

    from gaq_calc import GAQCalculator
    from gaq_calc.data import fit_reference_energies
    from gaq_calc.model import GAQPotential
    from gaq_calc.model.serialization import save_model

    torch.manual_seed(0)
    # tau_init 2 and random weights: forces of order 0.1-1 eV/Å, so the comparison has something to compare
    model = randomize(GAQPotential(tiny_config(species=QM9_SPECIES, tau_init=2.0)), seed=3, scale=0.3)
    model.set_energy_reference(fit_reference_energies(subset, QM9_SPECIES), 0.5)
    path = tmp_path / "qm9_tiny" / "model.pt"
    save_model(path, model.eval(), {"train_data": "qm9_subset"})
    k = int(np.flatnonzero([9 in n for n in subset.numbers])[0])  # a fluorine-containing molecule
    atoms = Atoms(numbers=subset.numbers[k], positions=subset.positions[k])
    energies = []
    for kernel in ("reference", "auto"):  # autograd, and the fused kernel where it builds
        atoms.calc = GAQCalculator(path, dtype="float64", kernel=kernel)
        energy = atoms.get_potential_energy()
        assert np.isfinite(energy) and abs(energy - subset.energies[k]) < 0.05 * abs(subset.energies[k])
        forces = atoms.get_forces()
        assert np.abs(forces).max() > 0.05
        fd = calculate_numerical_forces(atoms, eps=1e-4)
        np.testing.assert_allclose(forces, fd, atol=1e-6 * max(1.0, np.abs(fd).max()) + 1e-7, rtol=1e-5)
        energies.append(energy)
    assert energies[0] == pytest.approx(energies[1], abs=1e-8)


@pytest.mark.parametrize("name", ["qm9_u0_fp32", "qm9_u0_w8a8", "qm9_u0_w4a8"])
def test_qm9_configs_parse(name):
    from pathlib import Path

    cfg = TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.train_data == "qm9" and cfg.model.num_features == 64 and cfg.model.num_layers == 6
    assert cfg.checkpoint_minutes and cfg.n_val == 10000
    if cfg.quant:
        from gaq_calc.quant import preset

        assert cfg.quant.endswith("_frame") and cfg.init_from == "qm9_u0_fp32"
        preset(cfg.quant)


def test_gaq_report_qm9_table(tmp_path, monkeypatch):
    from gaq_calc.cli import report

    monkeypatch.setenv("GAQ_MODELS_DIR", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    readme = tmp_path / "README.md"
    blocks = "".join(f"<!-- {b}:start -->\n<!-- {b}:end -->\n" for b in ("results", "quant", "md", "speed", "qm9"))
    readme.write_text("intro\n" + blocks + "end\n")
    report.main(["--readme", str(readme), "--results", str(tmp_path / "results")])
    text = readme.read_text()
    for name in ("qm9_u0_fp32", "qm9_u0_w8a8", "qm9_u0_w4a8"):  # planned, no card: no numbers
        assert f"| {name} | – | – | – | – | not trained yet |" in text

    folder = tmp_path / "models" / "qm9_u0_fp32"
    folder.mkdir()
    (folder / "card.json").write_text(
        json.dumps(
            {
                "model": "qm9_u0_fp32",
                "model_file": str(folder / "model.pt"),
                "test_data": "qm9",
                "split": "test",
                "n_frames": 13087,
                "energy_mae_meV": 12.345,
                "lee_meV_per_A": 0.0012,
                "lee_float64_meV_per_A": 2e-11,
                "quantization": None,
                "mode": None,
                "size": {"packed_bytes": 1024 * 1200},
                "training": {"epochs": 120, "cpu_hours": 36.04},
            }
        )
    )
    (folder / "log.csv").write_text(
        "epoch,lr,val_energy_mae_meV,train_minutes\n"
        + "".join(f"{e},{1e-3 / e},{mae},{18 * e}\n" for e, mae in enumerate([90, 30, 20, 15, 14], start=1))
    )
    report.main(["--readme", str(readme), "--results", str(tmp_path / "results")])
    text = readme.read_text()
    assert (
        "| qm9_u0_fp32 | fp32 | – | FP32 | 13087 | 12.35 | 1.00x | 0.0012 | 2.0e-11 | yes | 120 | 1200 | 1.00x | 36.0 |"
        in text
    )
    assert "| qm9_u0_w4a8 | – | – | – | – | not trained yet |" in text
    assert "| qm9_u0_fp32 | 1 | 1.0e-03 | 18 | 90.00 |" in text  # the learning curve, one row an epoch
    assert "| qm9_u0_fp32 | 5 | 2.0e-04 | 90 | 14.00 |" in text
    results_block = text.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert "qm9_u0_fp32" not in results_block  # energy-only cards stay out of the rMD17 table


def test_dipole_features_are_the_energy_models(subset):
    """equivariant_features mirrors GAQPotential.forward: the readout of its features is the energy."""
    from gaq_calc.model import GAQPotential
    from gaq_calc.model.dipole import equivariant_features
    from gaq_calc.model.layers import scatter_sum

    torch.manual_seed(0)
    model = randomize(GAQPotential(tiny_config(species=QM9_SPECIES, tau_init=2.0)), seed=4).double().eval()
    b = GraphDataset(subset.subset(range(3)), QM9_SPECIES, 5.0).collate([0, 1, 2]).to("cpu", torch.float64)
    h, _ = equivariant_features(model, b.species, b.positions, b.receivers, b.senders, b.shifts)
    atomic = model.readout(h).squeeze(-1) * model.energy_scale + model.reference_energies[b.species]
    energy = model(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, b.n_graphs)
    torch.testing.assert_close(scatter_sum(atomic, b.batch, 3), energy, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dipole_is_rotation_equivariant_and_origin_free(subset, dtype, tol):
    from gaq_calc.metrics import random_rotations, rotated
    from gaq_calc.model.dipole import DipoleModel

    torch.manual_seed(0)
    model = randomize(DipoleModel(tiny_config(species=QM9_SPECIES, tau_init=2.0)), seed=1).to(dtype).eval()
    b = GraphDataset(subset.subset(range(5)), QM9_SPECIES, 5.0).collate(list(range(5))).to("cpu", dtype)
    call = lambda g: model(g.species, g.positions, g.receivers, g.senders, g.shifts, g.batch, g.n_graphs).detach()
    mu = call(b)
    assert mu.norm(dim=-1).min() > 0.1  # a non-trivial dipole to rotate
    for rot in random_rotations(3, seed=2, dtype=dtype):
        torch.testing.assert_close(call(rotated(b, rot)), mu @ rot.T, rtol=0, atol=tol * mu.abs().max().item())
    from dataclasses import replace

    shifted = replace(b, positions=b.positions + torch.tensor([3.0, -2.0, 1.0], dtype=dtype))
    torch.testing.assert_close(call(shifted), mu, rtol=0, atol=10 * tol * mu.abs().max().item())


def test_dipole_training_smoke(tmp_path):
    from gaq_calc.train.dipole import dipole_mae, load_dipole_model, train_dipole

    frames = read_frames("qm9_subset", "train")
    assert np.isfinite(frames.properties["mu_debye"]).all()
    _model, history = train_dipole(
        frames, tiny_config(tau_init=2.0), out=tmp_path, n_val=20, epochs=3, batch_size=16, lr=3e-3, log=lambda s: None
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    loaded, meta = load_dipole_model(tmp_path / "best.pt")
    test = GraphDataset(read_frames("qm9_subset", "test"), loaded.config.species, 5.0)
    assert np.isfinite(dipole_mae(loaded, test))
    assert meta["best_val_mu_mae_debye"] == min(h["val_mu_mae_debye"] for h in history)


def test_qat_export_and_eval_on_energy_only_data(trained, tmp_path):
    """The QM9 QAT path of configs/qm9_u0_w*a8.yaml and scripts/ship_model.sh, on the subset with a tiny model."""
    from gaq_calc.cli import evaluate, export, quantize
    from gaq_calc.loading import load_model
    from gaq_calc.quant import QuantLinear

    out = train(
        _config(
            tmp_path,
            "qat",
            epochs=2,
            init_from=str(trained / "best.pt"),
            quant="w4a8_frame",
            quant_warmup_epochs=1,
            lr=1e-4,
        ),
        progress=False,
        log=lambda s: None,
    )
    model, meta = load_model(out / "best.pt")
    assert any(isinstance(m, QuantLinear) for m in model.modules()) and meta["train_data"] == "qm9_subset"
    quantize.main([str(out / "best.pt"), "--references", "--calib-frames", "32", "-o", str(tmp_path / "q.pt")])
    export.main([str(tmp_path / "q.pt"), "-o", str(tmp_path / "q_artifact.pt")])
    for args, name in (
        ([str(tmp_path / "q.pt")], "card.json"),
        ([str(tmp_path / "q_artifact.pt"), "--data", "qm9_subset", "--mode", "conservative"], "card_conservative.json"),
    ):
        evaluate.main(args + ["--lee-frames", "2", "--lee-rotations", "1", "--card", str(tmp_path / name)])
        card = json.loads((tmp_path / name).read_text())
        assert card["split"] == "test" and np.isfinite(card["energy_mae_meV"]) and "force_mae_meV_per_A" not in card


@pytest.mark.slow
def test_full_qm9_from_qm9pack_matches_the_subset(subset):
    """With qm9pack installed (extra [qm9]): the full data, its split sizes, and the subset it was cut from."""
    import importlib.util

    if importlib.util.find_spec("qm9pack") is None:  # (located, not imported: its __init__ needs pkg_resources)
        pytest.skip("qm9pack is not installed")
    full = read_qm9("qm9", "all")
    assert len(full) == 130_831 and full.species == QM9_SPECIES
    assert int(is_test_index(full.ids).sum()) == 13_087
    row = {int(i): k for k, i in enumerate(full.ids)}
    for k in range(0, len(subset), 7):
        j = row[int(subset.ids[k])]
        assert full.energies[j] == subset.energies[k]
        assert full.properties["mu_debye"][j] == subset.properties["mu_debye"][k]
        np.testing.assert_array_equal(full.numbers[j], subset.numbers[k])
        np.testing.assert_allclose(full.positions[j], subset.positions[k], rtol=0, atol=1e-8)


SHIPPED_QM9 = sorted(p.parent.name for p in (Path(__file__).parents[1] / "models").glob("qm9_u0_*/card.json"))


@pytest.mark.parametrize("name", SHIPPED_QM9)
def test_shipped_qm9_model_gives_u0_and_its_gradient(name, subset):
    """GAQCalculator("qm9_u0_*") on held-out QM9 molecules: U0 in eV near the label, and forces the exact
    gradient of the energy (finite differences in float64; quantized models in their conservative mode)."""
    from ase.calculators.fd import calculate_numerical_forces

    from gaq_calc import GAQCalculator

    card = json.loads((Path(__file__).parents[1] / "models" / name / "card.json").read_text())
    test = subset.subset(np.flatnonzero(is_test_index(subset.ids))[:8])
    calc = GAQCalculator(name, dtype="float64", **({"mode": "conservative"} if card.get("quantization") else {}))
    errors = []
    for numbers, positions, label in zip(test.numbers, test.positions, test.energies):
        atoms = Atoms(numbers=numbers, positions=positions)
        atoms.calc = calc
        errors.append(atoms.get_potential_energy() - label)
    assert np.mean(np.abs(errors)) < max(10 * card["energy_mae_meV"] / 1000, 0.1)  # eV, U0 scale
    atoms = Atoms(numbers=test.numbers[0], positions=test.positions[0])
    atoms.calc = calc
    forces = atoms.get_forces()
    fd = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(forces, fd, atol=1e-6 * max(1.0, np.abs(fd).max()) + 1e-7, rtol=1e-5)
