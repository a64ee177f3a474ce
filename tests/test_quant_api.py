"""prepare/convert on a tiny model: QAT and packed integer models agree; weight-only quantization is equivariant."""

import numpy as np
import pytest
import torch
from helpers import ethanol_batch, randomize, tiny_config
from scipy.spatial.transform import Rotation

from gaq_calc.model import GAQPotential, energy_and_forces
from gaq_calc.quant import (
    PRESETS,
    ActKind,
    PackedLinear,
    QuantLinear,
    calibrate,
    convert,
    prepare,
    preset,
    set_mode,
    set_vector_quantization,
)


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return randomize(GAQPotential(tiny_config()), seed=5).double().eval()


def test_prepare_swaps_every_linear_by_branch(fp_model):
    q = prepare(fp_model, preset("w4a8"))
    linears = [m for m in q.modules() if type(m) is torch.nn.Linear]
    assert not linears
    quant = dict((n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear))
    vm, qk = quant["layers.0.vector_mix"], quant["layers.0.qk_proj"]
    assert vm.branch == "vector" and vm.weight_quantizer.bits == 4 and vm.act_quantizer.kind == ActKind.MDDQ
    assert qk.branch == "scalar" and qk.weight_quantizer.bits == 8 and qk.act_quantizer.kind == ActKind.LINEAR
    assert all(type(m) is not QuantLinear for m in fp_model.modules())  # the FP32 model is untouched


def test_mixed_precision_keeps_named_layers_unrounded(fp_model, tmp_path):
    """w4a8_frame_mp: radial-filter and readout inputs unrounded, every weight still quantized; the
    choice survives a save/load round trip (the config travels as plain data)."""
    from gaq_calc.loading import load_model
    from gaq_calc.model.serialization import save_model

    q = prepare(fp_model, preset("w4a8_frame_mp"))
    quant = dict((n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear))
    unrounded = sorted(n for n, m in quant.items() if m.act_quantizer.kind == ActKind.NONE)
    assert unrounded == ["radial.0", "radial.2", "readout.1", "readout.3"]
    assert all(m.weight_quantizer.enabled for m in quant.values())
    assert quant["layers.1.vector_mix"].act_quantizer.bits == 8 and quant["layers.1.qk_proj"].act_quantizer.bits == 8
    path = tmp_path / "mp.pt"
    for m in quant.values():
        if m.act_quantizer.kind != ActKind.NONE:
            m.act_quantizer.calibrated.fill_(True)
    save_model(path, q.eval(), {})
    loaded, _ = load_model(path, torch.float64)
    assert (
        sorted(
            n for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and m.act_quantizer.kind == ActKind.NONE
        )
        == unrounded
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_convert_gives_identical_outputs(fp_model, ethanol_frames, name):
    # (four frames: enough l=1 vectors for a 256-centroid k-means codebook)
    q = calibrate(
        prepare(fp_model, preset(name)), [ethanol_batch(ethanol_frames, [k]) for k in (0, 3, 4, 5)], energy_and_forces
    )
    if name == "svq_kmeans_w4a8":  # a baseline without gradients: QAT only
        with pytest.raises(ValueError, match="SVQ-KMeans"):
            convert(q)
        return
    ints = convert(q)
    assert any(isinstance(m, PackedLinear) for m in ints.modules())
    assert not any(isinstance(m, QuantLinear) for m in ints.modules())
    for k in (1, 2):
        e_q, f_q = energy_and_forces(q, ethanol_batch(ethanol_frames, [k]))
        e_i, f_i = energy_and_forces(ints, ethanol_batch(ethanol_frames, [k]))
        assert e_q.item() == e_i.item()  # the same function, bit for bit
        # forces: the QAT graph also tracks weights, which changes the order in which autograd sums
        # gradient contributions; only the last bits may differ
        torch.testing.assert_close(f_q, f_i, rtol=0, atol=1e-13)


def test_int_weights_are_in_range(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    calibrate(q, [ethanol_batch(ethanol_frames, [0])], energy_and_forces)
    for name, m in convert(q).named_modules():
        if isinstance(m, PackedLinear):
            lo, hi = (-7, 7) if m.weight_bits == 4 else (-127, 127)
            codes = m.codes()
            assert codes.dtype == torch.int8
            assert lo <= int(codes.min()) and int(codes.max()) <= hi, name


def test_weight_only_quantization_stays_exactly_equivariant(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4_weights_only")).eval()
    pos = ethanol_frames.positions[3]
    e0, f0 = energy_and_forces(q, ethanol_batch(ethanol_frames, [3]))
    fp_e, _ = energy_and_forces(fp_model, ethanol_batch(ethanol_frames, [3]))
    assert abs(e0.item() - fp_e.item()) > 1e-6  # quantization really changed the model
    rng = np.random.default_rng(0)
    for _ in range(3):
        R = Rotation.random(random_state=rng).as_matrix()
        e1, f1 = energy_and_forces(q, ethanol_batch(ethanol_frames, [3], positions=[pos @ R.T]))
        assert abs(e1.item() - e0.item()) < 1e-10
        np.testing.assert_allclose(f1.detach().numpy(), f0.detach().numpy() @ R.T, atol=1e-11)


def test_staged_warmup_switch(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    set_vector_quantization(q, False)
    vec = [m for m in q.modules() if isinstance(m, QuantLinear) and m.branch == "vector"]
    assert all(not m.weight_quantizer.enabled and not m.act_quantizer.enabled for m in vec)
    set_vector_quantization(q, True)
    assert all(m.weight_quantizer.enabled and m.act_quantizer.enabled for m in vec)


def test_qat_gradients_reach_weights_and_steps(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8")).train()
    batch = ethanol_batch(ethanol_frames, [0])
    calibrate(q, [batch], energy_and_forces)
    _e, f = energy_and_forces(q, batch, training=True)
    ((f - batch.forces) ** 2).mean().backward()
    vm = q.layers[1].vector_mix
    assert vm.weight.grad is not None and vm.weight.grad.abs().sum() > 0
    assert vm.weight_quantizer.log_step.grad.abs().sum() > 0
    step = vm.act_quantizer.log_step
    assert step.grad is not None and step.grad.abs() > 0  # MDDQ magnitude step learns


def test_convert_refuses_uncalibrated_or_warming_up_models(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    with pytest.raises(ValueError, match="calibrated"):
        convert(q)
    calibrate(q, [ethanol_batch(ethanol_frames, [0])], energy_and_forces)
    set_vector_quantization(q, False)
    with pytest.raises(ValueError, match="switched on"):
        convert(q)


def test_converted_model_holds_integer_weights_only(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    calibrate(q, [ethanol_batch(ethanol_frames, [0])], energy_and_forces)
    converted = convert(q)
    assert converted.state_dict()["layers.0.vector_mix.packed"].dtype == torch.uint8  # two 4-bit codes per byte
    # no float copy of the weights: the dequantized cache is empty until first use
    packed = [m for m in converted.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.weight.numel() == 0 for m in packed)


def _rotation_errors(model, frames, k=3, n=3):
    """Max |E(Rx) - E(x)| and max |F(Rx) - R F(x)| over n random rotations (float64)."""
    pos = frames.positions[k]
    e0, f0 = energy_and_forces(model, ethanol_batch(frames, [k]))
    rng = np.random.default_rng(1)
    de, df = 0.0, 0.0
    for _ in range(n):
        R = Rotation.random(random_state=rng).as_matrix()
        e1, f1 = energy_and_forces(model, ethanol_batch(frames, [k], positions=[pos @ R.T]))
        de = max(de, abs(e1.item() - e0.item()))
        df = max(df, float(np.abs(f1.detach().numpy() - f0.detach().numpy() @ R.T).max()))
    return de, df


def test_frame_quantized_activations_are_exactly_equivariant(fp_model, ethanol_frames):
    """W4A8 with l=1 activations in the local frame: every activation rounded, still equivariant to
    float64 noise, unlike MDDQ or Cartesian rounding of the same activations."""
    errors = {}
    for name in ("w4a8_frame", "w4a8", "lsq_w4a8"):
        q = calibrate(prepare(fp_model, preset(name)), [ethanol_batch(ethanol_frames, [0])], energy_and_forces).eval()
        errors[name] = _rotation_errors(q, ethanol_frames)
    de, df = errors["w4a8_frame"]
    assert de < 1e-10 and df < 1e-9, errors
    assert errors["w4a8"][1] > 1e-4 and errors["lsq_w4a8"][1] > 1e-4, errors  # the others are not


def test_qdrop_and_degree_quant_mask_only_in_training(fp_model, ethanol_frames):
    batch = ethanol_batch(ethanol_frames, [0])
    plain = calibrate(prepare(fp_model, preset("lsq_w4a8")), [batch], energy_and_forces).eval()
    e_plain = energy_and_forces(plain, batch)[0].item()
    for name in ("qdrop_w4a8", "degree_quant_w4a8"):
        q = calibrate(prepare(fp_model, preset(name)), [batch], energy_and_forces)
        plain_layers = dict(plain.named_modules())
        for n, m in q.named_modules():
            if isinstance(m, QuantLinear):
                m.act_quantizer.log_step.data.copy_(plain_layers[n].act_quantizer.log_step)
        q.eval()
        assert energy_and_forces(q, batch)[0].item() == e_plain  # eval: every activation quantized
        q.train()
        torch.manual_seed(0)
        assert energy_and_forces(q, batch)[0].item() != e_plain  # training: some stay full precision
    dq = next(m for m in q.modules() if isinstance(m, QuantLinear)).act_quantizer
    assert dq.node_degree is not None and int(dq.node_degree.sum()) == len(batch.receivers)


def test_percentile_range_is_tighter_than_min_max(fp_model, ethanol_frames):
    steps = {}
    for name in ("lsq_w4a8", "degree_quant_w4a8"):
        q = calibrate(
            prepare(fp_model, preset(name)), [ethanol_batch(ethanol_frames, [k]) for k in range(4)], energy_and_forces
        )
        steps[name] = torch.tensor(
            [m.act_quantizer.step_size().item() for m in q.modules() if isinstance(m, QuantLinear)]
        )
    tighter, minmax = steps["degree_quant_w4a8"], steps["lsq_w4a8"]
    assert (tighter <= minmax).all() and (tighter < 0.9 * minmax).any()


def test_svq_kmeans_codebook_from_calibration_and_no_gradient(fp_model, ethanol_frames):
    q = calibrate(
        prepare(fp_model, preset("svq_kmeans_w4a8")),
        [ethanol_batch(ethanol_frames, [k]) for k in range(4)],
        energy_and_forces,
    )
    vm = q.layers[1].vector_mix
    codebook = vm.act_quantizer.codebook
    assert codebook.abs().sum() > 0 and codebook.shape == (256, 3)
    x = torch.randn(5, 3, vm.weight.shape[1], dtype=torch.float64, requires_grad=True)
    out = vm.act_quantizer(x)
    assert not out.requires_grad  # hard assignment: no gradient approximation
    rows = out.transpose(-1, -2).reshape(-1, 3)
    gap = ((rows[:, None, :] - codebook[None]) ** 2).sum(-1).min(-1).values
    assert gap.max() == 0  # outputs are codewords


def test_conservative_mode_reference_energies_are_fitted_and_switch_with_the_mode(fp_model, ethanol_frames, tmp_path):
    from gaq_calc.loading import load_model
    from gaq_calc.model.serialization import save_model
    from gaq_calc.quant import fit_conservative_reference

    batches = [ethanol_batch(ethanol_frames, [k]) for k in range(6)]
    q = calibrate(prepare(fp_model, preset("w4a8_frame")), batches, energy_and_forces)
    before = q.reference_energies.clone()
    correction = fit_conservative_reference(q, batches, lambda m, b: energy_and_forces(m, b)[0])
    assert torch.equal(q.reference_energies, before)  # the quantized mode's references are untouched
    torch.testing.assert_close(q.conservative_reference_energies, before + correction, rtol=0, atol=0)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    set_mode(q, "conservative")
    assert all(not m.act_quantizer.enabled for m in q.modules() if isinstance(m, QuantLinear))
    # the mode is chosen at forward time: the state dict does not depend on it
    assert state.keys() == q.state_dict().keys() and all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    errors = [(b.energy - energy_and_forces(q, b)[0].detach()).item() for b in batches]
    assert abs(np.mean(errors)) < 1e-9  # least squares with a fixed composition: zero mean residual
    # a saved file restores both modes, starting in the quantized one
    path = tmp_path / "q.pt"
    save_model(path, q)
    loaded, _ = load_model(path, dtype=torch.float64)
    assert torch.equal(loaded.reference_energies, before)
    assert torch.equal(loaded.conservative_reference_energies, q.conservative_reference_energies)
    assert not loaded.conservative and all(m.act_quantizer.enabled for m in loaded.modules()
                                           if isinstance(m, QuantLinear))  # fmt: skip
    with pytest.raises(ValueError, match="mode"):
        set_mode(loaded, "fast")
    loaded32, _ = load_model(path)  # a float32 network keeps every reference set in float64
    for name in ("reference_energies", "conservative_reference_energies"):
        assert getattr(loaded32, name).dtype == torch.float64
    torch.testing.assert_close(loaded32.conservative_reference_energies, before + correction, rtol=0, atol=0)


def test_quantized_mode_reference_energies_remove_the_mean_error_and_change_no_force(fp_model, ethanol_frames):
    from gaq_calc.quant import fit_conservative_reference, fit_quantized_reference

    batches = [ethanol_batch(ethanol_frames, [k]) for k in range(6)]
    q = calibrate(prepare(fp_model, preset("w4a8_frame")), batches, energy_and_forces)
    before = [energy_and_forces(q, b) for b in batches]
    refs = q.reference_energies.clone()
    correction = fit_quantized_reference(q, batches, lambda m, b: energy_and_forces(m, b)[0])
    torch.testing.assert_close(q.reference_energies, refs + correction, rtol=0, atol=0)
    after = [energy_and_forces(q, b) for b in batches]
    errors = [(b.energy - e.detach()).item() for b, (e, _) in zip(batches, after)]
    assert abs(np.mean(errors)) < 1e-9  # fixed composition: zero mean residual in the quantized mode
    n_atoms = torch.bincount(batches[0].species, minlength=len(correction)).double()
    for (e0, f0), (e1, f1) in zip(before, after):  # an exact shift per element: forces and rounding unchanged
        torch.testing.assert_close(e1 - e0, (n_atoms * correction).sum().reshape(e1.shape).to(e1.dtype))
        assert torch.equal(f0, f1)
    # the conservative fit then starts from the corrected references (its residual mean is zero as well)
    fit_conservative_reference(q, batches, lambda m, b: energy_and_forces(m, b)[0])
    set_mode(q, "conservative")
    assert abs(np.mean([(b.energy - energy_and_forces(q, b)[0].detach()).item() for b in batches])) < 1e-9


def test_model_files_of_the_previous_layout_load_unchanged(fp_model, ethanol_frames, tmp_path):
    """Model files written before issue 14 kept the quantizers' tensors on QuantLinear (weight_log_step,
    act_log_step, calibrated, codebook) and a live copy of one mode's reference energies: they load into
    the current layout with the same numbers, in both modes."""
    from gaq_calc.loading import load_model
    from gaq_calc.model.serialization import read_model_file, save_model, write_model_file
    from gaq_calc.quant import fit_conservative_reference

    batches = [ethanol_batch(ethanol_frames, [k]) for k in range(4)]
    q = calibrate(prepare(fp_model, preset("w4a8_frame_mp")), batches, energy_and_forces)
    fit_conservative_reference(q, batches, lambda m, b: energy_and_forces(m, b)[0])
    path = tmp_path / "new.pt"
    save_model(path, q)
    data = read_model_file(path)
    old = {}
    for key, value in data["state_dict"].items():  # the previous layout of the same tensors
        key = key.replace("weight_quantizer.log_step", "weight_log_step").replace(
            "act_quantizer.log_step", "act_log_step"
        )
        old[key.replace("act_quantizer.", "")] = value
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear) and m.act_quantizer.kind == ActKind.NONE:  # dead tensors of unrounded layers
            old[f"{name}.act_log_step"] = torch.zeros((), dtype=torch.float64)
            old[f"{name}.calibrated"] = torch.zeros((), dtype=torch.bool)
        if isinstance(m, QuantLinear):
            old.setdefault(f"{name}.codebook", torch.zeros(256, 3, dtype=torch.float64))
    old["quantized_reference_energies"] = old["reference_energies"]
    old["reference_energies"] = old["conservative_reference_energies"]  # saved while in conservative mode
    write_model_file(tmp_path / "old.pt", {**data, "state_dict": old})
    new, _ = load_model(path, torch.float64)
    legacy, _ = load_model(tmp_path / "old.pt", torch.float64)
    for mode in ("quantized", "conservative"):
        set_mode(new, mode)
        set_mode(legacy, mode)
        for b in batches[:2]:
            e1, f1 = energy_and_forces(new, b)
            e2, f2 = energy_and_forces(legacy, b)
            assert e1.item() == e2.item() and torch.equal(f1, f2)


def test_round_at_bits_keeps_the_range_and_restores_the_quantizer():
    from gaq_calc.quant.api import round_at_bits
    from gaq_calc.quant.modules import LinearQuantizer

    q = LinearQuantizer(8)
    with torch.no_grad():
        q.log_step.fill_(-3.0)
    own_step, own_levels = q.step_size().item(), q.levels()
    round_at_bits(q, 10)
    assert q.bits == 10 and q.levels() > own_levels
    assert q.levels() * q.step_size().item() == pytest.approx(own_levels * own_step, rel=1e-6)  # same range
    round_at_bits(q, 12)
    assert q.levels() * q.step_size().item() == pytest.approx(own_levels * own_step, rel=1e-6)
    round_at_bits(q, None)
    assert q.bits == 8 and q.log_step.item() == -3.0


def test_round_at_bits_on_the_inference_form_keeps_the_range_and_restores_it():
    from gaq_calc.quant.api import round_at_bits
    from gaq_calc.quant.modules import FrameQuantizer

    q = FrameQuantizer(8, learned=False)
    q.step.fill_(0.03)
    own_step, own_range = q.step.item(), q.levels() * q.step.item()
    round_at_bits(q, 10)
    assert q.bits == 10 and q.levels() * q.step.item() == pytest.approx(own_range, rel=1e-6)
    round_at_bits(q, 6)
    assert q.bits == 6 and q.levels() * q.step.item() == pytest.approx(own_range, rel=1e-6)
    round_at_bits(q, None)
    assert q.bits == 8 and q.step.item() == own_step
