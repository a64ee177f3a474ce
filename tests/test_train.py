"""Trainer smoke tests on a tiny model: the loss goes down, and resuming equals not stopping."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from helpers import tiny_config

from gaq_calc.cli.train import parse_config
from gaq_calc.model.serialization import load_checkpoint_file
from gaq_calc.train import TrainConfig, train
from gaq_calc.train.schedule import cosine_lr, step_cosine_lr


def _config(tmp_path, name, data_file, **kw) -> TrainConfig:
    cfg = TrainConfig(
        train_data=str(data_file),
        out_dir=str(tmp_path / name),
        n_val=4,
        epochs=3,
        batch_size=4,
        lr=3e-3,
        warmup_epochs=1,
        model=tiny_config(),
        snapshot_minutes=0.0,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """24 ethanol frames as an extxyz file (also exercises the ASE reader)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from gaq_calc.data import read_frames

    frames = read_frames("ethanol", "train").subset(np.arange(24))
    images = []
    for k in range(len(frames)):
        atoms = Atoms(numbers=frames.numbers[k], positions=frames.positions[k])
        atoms.calc = SinglePointCalculator(atoms, energy=frames.energies[k], forces=frames.forces[k])
        images.append(atoms)
    path = tmp_path_factory.mktemp("data") / "ethanol24.extxyz"
    write(path, images)
    return path


def test_training_lowers_the_loss(tmp_path, small_data):
    # tau_init=2: with tau=10 a tiny model's initial attention weights are ~e^-10 and it needs more steps
    cfg = _config(tmp_path, "run", small_data, epochs=4, batch_size=2, lr=1e-2, model=tiny_config(tau_init=2.0))
    out = train(cfg, progress=False, log=lambda s: None)
    history = json.loads((out / "log.json").read_text())
    assert len(history) == 4
    assert history[-1]["train_loss"] < 0.85 * history[0]["train_loss"]
    for name in ("best.pt", "final.pt", "checkpoint.pt", "log.csv", "learning_curves.png", "snapshot_0min.pt"):
        assert (out / name).exists(), name
    ckpt = load_checkpoint_file(out / "checkpoint.pt")  # plain data and tensors only
    assert ckpt["state"]["epoch"] == 4


@pytest.mark.parametrize("stop", ["epoch", "step"])
@pytest.mark.parametrize("schedule", ["cosine", "cosine_steps"])
def test_resume_reproduces_uninterrupted_run(tmp_path, small_data, schedule, stop):
    kw = {"schedule": schedule, "checkpoint_minutes": 1e6}  # mid-epoch checkpoints only when stopped there
    straight = train(_config(tmp_path, "straight", small_data, **kw), progress=False, log=lambda s: None)
    cfg = _config(tmp_path, "stopped", small_data, **kw)
    stop_at = {"stop_after_epochs": 1} if stop == "epoch" else {"stop_after_steps": 3}  # inside epoch 1
    train(cfg, progress=False, log=lambda s: None, **stop_at)
    state = load_checkpoint_file(tmp_path / "stopped" / "checkpoint.pt")["state"]
    assert (state["epoch"], state["step"]) == ((1, 0) if stop == "epoch" else (0, 3))
    resumed = train(_config(tmp_path, "stopped", small_data, **kw), progress=False, log=lambda s: None)
    a = torch.load(straight / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "final.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    la = json.loads((straight / "log.json").read_text())
    lb = json.loads((resumed / "log.json").read_text())
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_refused_and_left_as_it_is(tmp_path, small_data, damage):
    from gaq_calc.model.serialization import ModelFileError

    cfg = _config(tmp_path, "run", small_data, epochs=2)
    train(cfg, progress=False, stop_after_epochs=1, log=lambda s: None)
    path = tmp_path / "run" / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":  # one byte of the weights, inside the hashed payload
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 3 :]
    path.write_bytes(bytes(data))
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    with pytest.raises(ModelFileError, match="checkpoint.*(SHA-256|cannot be read)") as err:
        train(_config(tmp_path, "run", small_data, epochs=2), progress=False, log=lambda s: None)
    assert "\n" not in str(err.value)
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before  # nothing written


def test_resume_refuses_a_changed_config(tmp_path, small_data):
    train(_config(tmp_path, "run", small_data, epochs=1), progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="different config"):
        train(_config(tmp_path, "run", small_data, epochs=1, lr=1e-2), progress=False, log=lambda s: None)


def test_cli_yaml_and_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 7\nlr: 0.002\nmodel:\n  num_layers: 3\n")
    cfg, _ = parse_config(["--config", str(yaml_file), "--lr", "0.001", "--model-num-features", "32"])
    assert (cfg.epochs, cfg.lr, cfg.model.num_layers, cfg.model.num_features) == (7, 0.001, 3, 32)


def test_unknown_yaml_key_is_an_error(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochz: 7\n")
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_yaml(yaml_file)


def test_cosine_schedule_shape():
    lrs = [cosine_lr(e, 1e-2, 1e-5, 2, 10) for e in range(10)]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_step_cosine_schedule_warms_up_then_anneals_to_min_lr_at_the_last_step():
    steps = [e + k / 100 for e in range(4) for k in range(100)] + [4.0]
    lrs = [step_cosine_lr(t, 1e-3, 1e-6, 0.05, 4) for t in steps]
    assert 0 < lrs[0] < 1e-4 and lrs[5] == pytest.approx(1e-3)  # linear warm-up over 5 of 100 steps
    assert all(a >= b for a, b in itertools.pairwise(lrs[5:]))
    assert lrs[-1] == pytest.approx(1e-6) and lrs[-2] < 2e-6


def test_cosine_steps_schedule_sets_the_lr_before_every_step(tmp_path, small_data):
    cfg = _config(tmp_path, "steps", small_data, epochs=2, schedule="cosine_steps", warmup_epochs=0.5, min_lr=1e-6)
    train(cfg, progress=False, log=lambda s: None)
    with open(tmp_path / "steps" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < 3e-3 and lrs[-1] < 0.1 * 3e-3  # the last step of the last epoch is near min_lr


def test_qat_fine_tunes_from_fp32_and_saves_a_loadable_quantized_model(tmp_path, small_data):
    from gaq_calc.loading import load_model
    from gaq_calc.quant import QuantLinear

    fp32 = train(
        _config(tmp_path, "fp32", small_data, epochs=1, model=tiny_config(tau_init=2.0)),
        progress=False,
        log=lambda s: None,
    )
    cfg = _config(
        tmp_path,
        "qat",
        small_data,
        epochs=2,
        init_from=str(fp32 / "final.pt"),
        quant="w4a8",
        quant_warmup_epochs=1,
        lee_weight=0.1,
        model=tiny_config(tau_init=2.0),
    )
    out = train(cfg, progress=False, log=lambda s: None)
    model, _meta = load_model(out / "final.pt")
    vector = [m for n, m in model.named_modules() if n.endswith("vector_mix")]
    assert vector and all(isinstance(m, QuantLinear) and m.weight_quantizer.bits == 4 for m in vector)
    assert all(bool(m.act_quantizer.calibrated) for m in vector)
    history = json.loads((out / "log.json").read_text())
    assert all(np.isfinite(r["train_loss"]) for r in history)

    # a QAT run stopped at the warm-up boundary and resumed equals the uninterrupted run
    def stopped():
        return _config(
            tmp_path,
            "qat_stopped",
            small_data,
            epochs=2,
            init_from=str(fp32 / "final.pt"),
            quant="w4a8",
            quant_warmup_epochs=1,
            lee_weight=0.1,
            model=tiny_config(tau_init=2.0),
        )

    train(stopped(), progress=False, stop_after_epochs=1, log=lambda s: None)
    resumed = train(
        stopped(),
        progress=False,
        log=lambda s: None,
    )
    a = torch.load(out / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "final.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_per_tensor_steps_stay_per_tensor_under_qat(tmp_path, small_data):
    from gaq_calc.loading import load_model
    from gaq_calc.quant import QuantLinear

    fp32 = train(_config(tmp_path, "fp32", small_data, epochs=1), progress=False, log=lambda s: None)
    out = train(
        _config(tmp_path, "naive", small_data, epochs=1, init_from=str(fp32 / "final.pt"), quant="naive_int8"),
        progress=False,
        log=lambda s: None,
    )
    model, _ = load_model(out / "final.pt")
    assert all(m.weight_quantizer.log_step.numel() == 1 for m in model.modules() if isinstance(m, QuantLinear))


def test_lee_metric_is_float_noise_for_fp32_and_positive_for_w4a8(tmp_path, ethanol_frames):
    from helpers import randomize

    from gaq_calc.data import GraphDataset
    from gaq_calc.metrics import local_equivariance_error
    from gaq_calc.model import GAQPotential, energy_and_forces
    from gaq_calc.quant import calibrate, prepare, preset

    torch.manual_seed(0)
    fp = randomize(GAQPotential(tiny_config()), seed=2).double().eval()
    ds = GraphDataset(ethanol_frames.subset([0, 1, 2]), [1, 6, 8], 5.0)
    assert local_equivariance_error(fp, ds, n_rotations=2)["lee_meV_per_A"] < 1e-8
    q = calibrate(prepare(fp, preset("w4a8")), [ds.collate([0]).to("cpu", torch.float64)], energy_and_forces)
    assert local_equivariance_error(q, ds, n_rotations=2)["lee_meV_per_A"] > 1e-6
    # every activation rounded, but in the equivariant local frame: float64 noise only
    # (calibrated on another frame: a component sitting exactly on the clipping edge, as the calibration
    # frame's own peak does, switches its straight-through gradient on or off with the last bit)
    other = GraphDataset(ethanol_frames.subset([5]), [1, 6, 8], 5.0).collate([0]).to("cpu", torch.float64)
    q = calibrate(prepare(fp, preset("w4a8_frame")), [other], energy_and_forces)
    assert local_equivariance_error(q, ds, n_rotations=2)["lee_meV_per_A"] < 1e-8


@pytest.mark.parametrize("name", ["azobenzene_fp32", "ethanol_fp32", "azobenzene_w4a8", "azobenzene_w8a8"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    cfg = TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.model.num_features == 64 and cfg.model.num_layers == 6
    if cfg.quant:
        from gaq_calc.quant import preset

        preset(cfg.quant)


def test_distilled_targets_mix_teacher_and_labels(tiny_model_file, ethanol_frames):
    """distill_weight 1: the targets are the teacher's energies and forces; 0: the DFT labels; 0.5: the mean."""
    from gaq_calc.data import GraphDataset
    from gaq_calc.loading import load_model
    from gaq_calc.metrics import predict
    from gaq_calc.train.loop import distilled_targets

    frames = ethanol_frames.subset(np.arange(6))
    teacher, _ = load_model(tiny_model_file, torch.float64)
    energies, forces = predict(teacher, GraphDataset(frames, [1, 6, 8], teacher.cutoff))
    for w in (1.0, 0.0, 0.5):
        mixed = distilled_targets(frames, TrainConfig(distill_from=str(tiny_model_file), distill_weight=w))
        np.testing.assert_allclose(mixed.energies, w * energies + (1 - w) * frames.energies, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mixed.forces[3], w * forces[3] + (1 - w) * frames.forces[3], rtol=0, atol=1e-12)
    assert not np.allclose(energies, frames.energies)  # the teacher is not the labels: the test can tell
    with pytest.raises(ValueError, match="distill_weight"):
        distilled_targets(frames, TrainConfig(distill_from=str(tiny_model_file), distill_weight=1.5))


def test_a_qat_checkpoint_of_the_previous_layout_resumes_exactly(tmp_path, small_data):
    """A QAT run checkpointed before issue 14 (quantizer tensors on QuantLinear, a dead activation step in
    each unrounded layer and its optimizer slot) resumes into the current layout and ends where the
    uninterrupted run ends."""
    fp32 = train(
        _config(tmp_path, "fp32", small_data, epochs=1, model=tiny_config(tau_init=2.0)),
        progress=False,
        log=lambda s: None,
    )

    def cfg(name):
        return _config(
            tmp_path,
            name,
            small_data,
            epochs=2,
            init_from=str(fp32 / "final.pt"),
            quant="w4a8_frame_mp",
            model=tiny_config(tau_init=2.0),
        )

    straight = train(cfg("straight"), progress=False, log=lambda s: None)
    train(cfg("stopped"), progress=False, stop_after_epochs=1, log=lambda s: None)
    path = tmp_path / "stopped" / "checkpoint.pt"
    ckpt = load_checkpoint_file(path)

    from gaq_calc.loading import load_model
    from gaq_calc.quant import ActKind, QuantLinear

    model, _ = load_model(straight / "final.pt")
    unrounded = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)
                 and m.act_quantizer.kind == ActKind.NONE}  # fmt: skip
    assert unrounded  # the mixed-precision preset keeps the radial and readout inputs unrounded

    def old_name(key):
        key = key.replace("weight_quantizer.log_step", "weight_log_step")
        return key.replace("act_quantizer.log_step", "act_log_step").replace("act_quantizer.", "")

    def legacy(state):  # the same tensors in the previous layout, with the dead steps
        out = {old_name(k): v for k, v in state.items()}
        out.update({f"{n}.act_log_step": torch.zeros(()) for n in unrounded})
        out["quantized_reference_energies"] = out["reference_energies"]
        return out

    order = []  # the previous layout's parameter order: each layer's dead step after its weight step
    for name, _ in model.named_parameters():
        order.append(old_name(name))
        if name.endswith("weight_quantizer.log_step") and name.rsplit(".", 2)[0] in unrounded:
            order.append(name.rsplit(".", 2)[0] + ".act_log_step")
    alive = [i for i, k in enumerate(order) if not k.endswith("act_log_step") or k.rsplit(".", 1)[0] not in unrounded]
    group = ckpt["optimizer"]["param_groups"][0]
    ckpt["optimizer"] = {
        "state": {alive[j]: s for j, s in ckpt["optimizer"]["state"].items()},
        "param_groups": [{**group, "params": list(range(len(order)))}],
    }
    # the saved state dict lists parameters in parameter order (dead steps included)
    ckpt["model"], ckpt["ema"] = legacy(ckpt["model"]), legacy(ckpt["ema"])
    ckpt["model"] = {**{k: ckpt["model"][k] for k in order}, **ckpt["model"]}
    torch.save(ckpt, path)
    resumed = train(cfg("stopped"), progress=False, log=lambda s: None)
    a = torch.load(straight / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
