"""prepare/convert on a tiny model: QAT and integer models agree; weight-only quantization is equivariant."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import randomize, tiny_config
from gaq_calc.data import GraphDataset
from gaq_calc.model import GAQPotential, energy_and_forces
from gaq_calc.quant import IntLinear, QuantLinear, convert, prepare, preset, set_vector_quantization


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return randomize(GAQPotential(tiny_config()), seed=5).double().eval()


def _batch(frames, k=0, positions=None):
    frames = frames.subset([k])
    if positions is not None:
        frames.positions = [positions]
    return GraphDataset(frames, [1, 6, 8], 5.0).collate([0]).to("cpu", torch.float64)


def test_prepare_swaps_every_linear_by_branch(fp_model):
    q = prepare(fp_model, preset("w4a8"))
    linears = [m for m in q.modules() if type(m) is torch.nn.Linear]
    assert not linears
    quant = dict((n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear))
    assert quant["layers.0.vector_mix"].branch == "vector" and quant["layers.0.vector_mix"].weight_bits == 4
    assert quant["layers.0.qk_proj"].branch == "scalar" and quant["layers.0.qk_proj"].weight_bits == 8
    assert all(type(m) is not QuantLinear for m in fp_model.modules())  # the FP32 model is untouched


@pytest.mark.parametrize("name", ["w4a8", "w8a8", "naive_int8", "w4_weights_only"])
def test_convert_gives_identical_outputs(fp_model, ethanol_frames, name):
    q = prepare(fp_model, preset(name))
    energy_and_forces(q, _batch(ethanol_frames, 0))  # calibrates activation ranges
    ints = convert(q)
    assert any(isinstance(m, IntLinear) for m in ints.modules())
    for k in (1, 2):
        e_q, f_q = energy_and_forces(q, _batch(ethanol_frames, k))
        e_i, f_i = energy_and_forces(ints, _batch(ethanol_frames, k))
        assert e_q.item() == e_i.item()  # the same function, bit for bit
        # forces: the QAT graph also tracks weights, which changes the order in which autograd sums
        # gradient contributions; only the last bits may differ
        torch.testing.assert_close(f_q, f_i, rtol=0, atol=1e-13)


def test_int_weights_are_in_range(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    energy_and_forces(q, _batch(ethanol_frames, 0))
    for name, m in convert(q).named_modules():
        if isinstance(m, IntLinear):
            lo, hi = (-7, 7) if m.weight_bits == 4 else (-127, 127)
            assert m.weight_codes.dtype == torch.int8
            assert lo <= int(m.weight_codes.min()) and int(m.weight_codes.max()) <= hi, name


def test_weight_only_quantization_stays_exactly_equivariant(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4_weights_only")).eval()
    pos = ethanol_frames.positions[3]
    e0, f0 = energy_and_forces(q, _batch(ethanol_frames, 3))
    fp_e, _ = energy_and_forces(fp_model, _batch(ethanol_frames, 3))
    assert abs(e0.item() - fp_e.item()) > 1e-6  # quantization really changed the model
    rng = np.random.default_rng(0)
    for _ in range(3):
        R = Rotation.random(random_state=rng).as_matrix()
        e1, f1 = energy_and_forces(q, _batch(ethanol_frames, 3, pos @ R.T))
        assert abs(e1.item() - e0.item()) < 1e-10
        np.testing.assert_allclose(f1.detach().numpy(), f0.detach().numpy() @ R.T, atol=1e-11)


def test_staged_warmup_switch(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    set_vector_quantization(q, False)
    vec = [m for m in q.modules() if isinstance(m, QuantLinear) and m.branch == "vector"]
    assert all(not m.quantize_weights and not m.quantize_acts for m in vec)
    set_vector_quantization(q, True)
    assert all(m.quantize_weights and m.quantize_acts for m in vec)


def test_qat_gradients_reach_weights_and_steps(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8")).train()
    batch = _batch(ethanol_frames, 0)
    energy_and_forces(q, batch)  # calibrate
    e, f = energy_and_forces(q, batch, training=True)
    ((f - batch.forces) ** 2).mean().backward()
    vm = q.layers[1].vector_mix
    assert vm.weight.grad is not None and vm.weight.grad.abs().sum() > 0
    assert vm.weight_step.grad.abs().sum() > 0
    assert vm.act_step.grad is not None and vm.act_step.grad.abs() > 0  # MDDQ magnitude step learns


def test_convert_refuses_uncalibrated_or_warming_up_models(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    with pytest.raises(ValueError, match="calibrated"):
        convert(q)
    energy_and_forces(q, _batch(ethanol_frames, 0))
    set_vector_quantization(q, False)
    with pytest.raises(ValueError, match="switched on"):
        convert(q)


def test_converted_model_holds_integer_weights_only(fp_model, ethanol_frames):
    q = prepare(fp_model, preset("w4a8"))
    energy_and_forces(q, _batch(ethanol_frames, 0))
    names = set(convert(q).state_dict())
    assert "layers.0.vector_mix.weight_codes" in names
    assert not any(n.endswith("vector_mix.weight") or n.endswith("act.weight") for n in names)
