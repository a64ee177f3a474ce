"""Symmetry and conservativeness of the FP32 network, checked in float64."""

import numpy as np
import pytest
import torch
from helpers import ethanol_batch, randomize, tiny_config
from scipy.spatial.transform import Rotation

from gaq_calc.data import GraphDataset
from gaq_calc.model import GAQPotential, ModelConfig, energy_and_forces


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return randomize(GAQPotential(tiny_config()), seed=3).double().eval()


def _ef(model, frames, k, positions=None):
    e, f = energy_and_forces(model, ethanol_batch(frames, [k], positions=None if positions is None else [positions]))
    return e.item(), f.detach().numpy()


def test_rotation_translation_equivariance_float64(model64, ethanol_frames):
    rng = np.random.default_rng(0)
    for k in range(3):
        pos = ethanol_frames.positions[k]
        e0, f0 = _ef(model64, ethanol_frames, k)
        for _ in range(3):
            R = Rotation.random(random_state=rng).as_matrix()
            t = rng.normal(size=3) * 5
            e1, f1 = _ef(model64, ethanol_frames, k, pos @ R.T + t)
            assert abs(e1 - e0) < 1e-10 * max(1.0, abs(e0))
            np.testing.assert_allclose(f1, f0 @ R.T, atol=1e-11)
        assert np.abs(f0).max() > 1e-3  # the check is not vacuous


def test_permutation_equivariance_float64(model64, ethanol_frames):
    frames = ethanol_frames.subset([0])
    e0, f0 = _ef(model64, frames, 0)
    perm = np.random.default_rng(1).permutation(9)
    frames.numbers = [frames.numbers[0][perm]]
    frames.positions = [frames.positions[0][perm]]
    e1, f1 = _ef(model64, frames, 0)
    assert abs(e1 - e0) < 1e-9
    np.testing.assert_allclose(f1, f0[perm], atol=1e-11)


def test_forces_are_minus_energy_gradient(model64, ethanol_frames):
    pos = ethanol_frames.positions[2].copy()
    _, f = _ef(model64, ethanol_frames, 2)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 1), (8, 2), (5, 0)]:
        plus, minus = pos.copy(), pos.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(_ef(model64, ethanol_frames, 2, plus)[0] - _ef(model64, ethanol_frames, 2, minus)[0]) / (2 * h)
        assert f[atom, axis] == pytest.approx(fd, abs=1e-6)


def test_energy_smooth_when_atom_crosses_cutoff(model64):
    """An atom leaving the 5 Å sphere changes the energy and its gradient continuously."""
    from gaq_calc.data.frames import Frames

    def energy(x):
        pos = np.array([[0.0, 0.0, 0.0], [1.1, 0.3, 0.0], [x, 0.0, 0.0]])  # atom 2 on the x axis
        frames = Frames([np.array([6, 1, 8])], [pos], np.zeros(1), [np.zeros((3, 3))])
        return _ef(model64, frames, 0)

    from gaq_calc.data import neighbour_graph

    assert len(neighbour_graph(np.array([[0.0, 0, 0], [5.0 - 1e-7, 0, 0]]), 5.0)[0]) == 2  # the edge exists
    assert len(neighbour_graph(np.array([[0.0, 0, 0], [5.0 + 1e-7, 0, 0]]), 5.0)[0]) == 0  # and then not
    inside, _ = energy(5.0 - 1e-7)
    outside, f_out = energy(5.0 + 1e-7)
    far, _ = energy(5.5)
    assert abs(far - outside) > 1e-6  # atom 2 still interacts with atom 1, so the check is not vacuous
    assert abs(inside - outside) < 1e-9
    _, f_in = energy(5.0 - 1e-4)
    np.testing.assert_allclose(f_in, f_out, atol=1e-6)


def test_float32_and_float64_agree(ethanol_frames):
    torch.manual_seed(0)
    m32 = randomize(GAQPotential(tiny_config()), seed=4).eval()
    m64 = GAQPotential(tiny_config()).double().eval()
    m64.load_state_dict(m32.state_dict())
    b32 = GraphDataset(ethanol_frames, [1, 6, 8], 5.0).collate([0]).to("cpu", torch.float32)
    e32, f32 = energy_and_forces(m32, b32)
    e64, f64 = energy_and_forces(m64, ethanol_batch(ethanol_frames, [0]))
    assert e32.dtype == torch.float64  # the total energy is always float64
    assert e32.item() == pytest.approx(e64.item(), abs=1e-3)
    np.testing.assert_allclose(f32.detach().numpy(), f64.detach().numpy(), atol=1e-3)


def test_reference_energies_stay_float64_after_cast():
    model = GAQPotential(tiny_config())
    model.set_energy_reference([-13.123456789012, -1030.987654321098, -2040.5], 1.0)
    model = model.float()
    assert model.reference_energies.dtype == torch.float64
    assert model.reference_energies[1].item() == -1030.987654321098
    assert model.energy_scale.dtype == torch.float32


def test_default_config_matches_spec():
    cfg = ModelConfig()
    assert (cfg.num_features, cfg.num_layers, cfg.cutoff) == (64, 6, 5.0)


def test_branches_are_named_separately():
    names = {n for n, _ in GAQPotential(tiny_config()).named_modules()}
    assert "layers.0.vector_mix" in names and "layers.0.qk_proj" in names and "layers.0.value_proj" in names


def test_model_does_not_touch_global_torch_state(ethanol_frames):
    before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())
    model = GAQPotential(tiny_config()).double()
    with torch.no_grad():
        energy_and_forces(model, ethanol_batch(ethanol_frames, [0]))
        assert torch.is_grad_enabled() is False
    assert (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()) == before
