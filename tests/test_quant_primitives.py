"""Quantization primitives: ranges, round trips, STE gradients, codebooks and MDDQ bounds."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gaq_calc.quant import (
    covering_radius,
    fake_quantize,
    fibonacci_sphere,
    mddq,
    qrange,
    quantize_direction,
    quantize_int,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_linear_quantizer_range_and_round_trip(bits):
    qmin, qmax = qrange(bits)
    assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    step = torch.tensor(0.1, dtype=torch.float64)
    x = torch.linspace(-2, 2, 1001, dtype=torch.float64)
    codes = quantize_int(x, step, bits)
    assert codes.dtype == torch.int8 and codes.min() >= qmin and codes.max() <= qmax
    xq = fake_quantize(x, step, bits)
    torch.testing.assert_close(xq, codes.double() * step)
    inside = x.abs() <= qmax * step
    assert (xq - x)[inside].abs().max() <= step / 2 + 1e-12  # rounding error within half a step
    torch.testing.assert_close(fake_quantize(xq, step, bits), xq)  # idempotent


def test_bad_bit_width():
    with pytest.raises(ValueError):
        qrange(17)
    with pytest.raises(ValueError):  # codes are stored as int8
        quantize_int(torch.ones(3), torch.tensor(0.1), 9)
    with pytest.raises(ValueError):
        qrange(1)


def test_ste_and_lsq_gradients():
    x = torch.tensor([0.04, -0.53, 3.0], dtype=torch.float64, requires_grad=True)
    step = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    fake_quantize(x, step, 4).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))  # clipped at 0.7
    # LSQ: d q / d s = round(x/s) - x/s inside the range, qmax where clipped; scaled by 1/sqrt(N qmax)
    expected = ((0.0 - 0.4) + (-5.0 + 5.3) + 7.0) / (3 * 7) ** 0.5
    assert step.grad.item() == pytest.approx(expected, rel=1e-9)


def test_per_channel_steps_broadcast():
    w = torch.randn(8, 5)
    step = w.abs().amax(dim=1, keepdim=True) / 7
    codes = quantize_int(w, step, 4)
    assert (codes.abs().amax(dim=1) == 7).all()  # each row uses its full range


@pytest.mark.parametrize("n", [16, 64, 256])
def test_codebook_unit_norm_and_covering_radius(n):
    c = fibonacci_sphere(n)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-12)
    rho = covering_radius(c)
    # a cap-area bound: n caps of angular radius rho must cover the sphere, so n * 2pi(1 - cos rho) >= 4pi
    assert n * (1 - math.cos(rho)) >= 2.0
    assert rho < 2.2 * math.acos(1 - 2.0 / n)  # and it is not far from that bound
    # brute-force check: no random direction is farther than rho from its codeword
    u = np.random.default_rng(0).normal(size=(20000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    assert np.arccos(np.clip(u @ c.T, -1, 1).max(axis=1)).max() <= rho + 1e-9


def test_direction_error_never_above_covering_radius():
    c = torch.from_numpy(fibonacci_sphere(64))
    rho = covering_radius(c.numpy())
    u = torch.randn(50000, 3, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    q = quantize_direction(u, c)
    angle = torch.arccos((q * u).sum(-1).clamp(-1, 1))
    assert angle.max() <= rho + 1e-9
    # the chosen codeword is the nearest one
    assert torch.equal((u @ c.T).argmax(-1), (q @ c.T).argmax(-1))


def test_geometric_ste_gradient_is_tangent():
    c = torch.from_numpy(fibonacci_sphere(32))
    u = torch.randn(1000, 3, dtype=torch.float64)
    u = (u / u.norm(dim=-1, keepdim=True)).requires_grad_(True)
    g = torch.randn(1000, 3, dtype=torch.float64)
    (quantize_direction(u, c) * g).sum().backward()
    radial = (u.grad * u.detach()).sum(-1)
    assert radial.abs().max() < 1e-12  # <u, dL/du> = 0 (Prop. III.1)
    expected = g - (g * u.detach()).sum(-1, keepdim=True) * u.detach()
    torch.testing.assert_close(u.grad, expected)


def test_mddq_magnitude_and_direction_errors_and_zero_vector():
    c = torch.from_numpy(fibonacci_sphere(256))
    rho = covering_radius(c.numpy())
    step = torch.tensor(0.05, dtype=torch.float64)
    v = torch.randn(5000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = mddq(v, c, step, magnitude_bits=8)
    assert ((q.norm(dim=-1) - v.norm(dim=-1)).abs() <= step / 2 + 1e-9).all()
    kept = q.norm(dim=-1) > 0  # vectors shorter than step/2 quantize to zero (no direction)
    assert kept.sum() > 4900
    q, v = q[kept], v[kept]
    cos = (q * v).sum(-1) / (q.norm(dim=-1) * v.norm(dim=-1))
    assert torch.arccos(cos.clamp(-1, 1)).max() <= rho + 1e-9
    zero = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    out = mddq(zero, c, step, magnitude_bits=8)
    assert torch.equal(out.detach(), torch.zeros(4, 3, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_local_frame_is_orthonormal_right_handed_and_rotates_with_the_vectors():
    from gaq_calc.quant.primitives import local_frame

    torch.manual_seed(0)
    v = torch.randn(20, 3, 16, dtype=torch.float64)
    frame = local_frame(v)  # [20, 3, 3] rows e1, e2, e3
    torch.testing.assert_close(frame @ frame.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(20, 3, 3))
    torch.testing.assert_close(torch.linalg.det(frame), torch.ones(20, dtype=torch.float64))
    R = torch.as_tensor(Rotation.random(random_state=3).as_matrix())
    torch.testing.assert_close(local_frame(R @ v), frame @ R.T, rtol=0, atol=1e-12)


def test_frame_quantize_commutes_with_rotations_and_stays_within_half_a_step():
    from gaq_calc.quant.primitives import frame_quantize

    torch.manual_seed(1)
    v = torch.randn(30, 3, 8, dtype=torch.float64)
    step = torch.tensor(0.05, dtype=torch.float64)
    q = frame_quantize(v, step, 8)
    for seed in range(3):
        R = torch.as_tensor(Rotation.random(random_state=seed).as_matrix())
        torch.testing.assert_close(frame_quantize(R @ v, step, 8), R @ q, rtol=0, atol=1e-12)
    # error per frame component <= step / 2, so |error| <= sqrt(3) step / 2
    assert (q - v).norm(dim=-2).max() <= 3**0.5 * 0.025 + 1e-12
    # straight-through: the gradient w.r.t. v is the identity inside the range
    x = v.clone().requires_grad_(True)
    frame_quantize(x, step, 8).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(v))


def test_frame_quantize_degenerate_inputs():
    from gaq_calc.quant.primitives import frame_quantize

    step = torch.tensor(0.1, dtype=torch.float64)
    zero = torch.zeros(2, 3, 4, dtype=torch.float64)
    assert torch.equal(frame_quantize(zero, step, 8), zero)
    axis = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)
    collinear = axis[None, :, None] * torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)  # [1, 3, 4]
    q = frame_quantize(collinear, step, 8)
    assert torch.isfinite(q).all()
    cross = torch.linalg.cross(q.transpose(-1, -2), axis.expand(1, 4, 3))
    assert cross.abs().max() < 1e-12  # stays on the common axis


def test_kmeans_centroids_find_separated_clusters():
    from gaq_calc.quant.primitives import kmeans_centroids, nearest_centroid

    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, 0, 0]], dtype=torch.float64)
    data = (centres[:, None, :] + 0.01 * torch.randn(4, 50, 3, generator=gen, dtype=torch.float64)).reshape(-1, 3)
    codebook = kmeans_centroids(data, 4, seed=0)
    assert torch.cdist(centres, codebook).min(-1).values.max() < 0.05
    assert torch.equal(nearest_centroid(centres, codebook), codebook[torch.cdist(centres, codebook).argmin(-1)])


@pytest.mark.parametrize("name", ["fake_quantize", "frame_quantize", "mddq", "quantize_direction", "nearest_centroid"])
def test_rounding_functions_script_to_the_same_numbers(name):
    """Every rounding primitive is TorchScript-compatible (QAT, the artifact and the fused kernel's Python side
    share them): the scripted function gives the eager one's outputs and gradients bit for bit."""
    import warnings

    from gaq_calc.quant import primitives

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, 3, 5, dtype=torch.float64, generator=gen)
    step = torch.tensor(0.05, dtype=torch.float64)
    codebook = torch.from_numpy(fibonacci_sphere(64))
    args = {
        "fake_quantize": lambda x: (x, step, 8),
        "frame_quantize": lambda x: (x, step, 8),
        "mddq": lambda x: (x.transpose(-1, -2), codebook, step, 8),
        "quantize_direction": lambda x: (x.transpose(-1, -2) / x.norm(dim=-2).unsqueeze(-1), codebook),
        "nearest_centroid": lambda x: (x.transpose(-1, -2), codebook),
    }[name]
    eager = getattr(primitives, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(eager)
    outputs, grads = [], []
    for fn in (eager, scripted):
        x = v.clone().requires_grad_(True)
        out = fn(*args(x))
        outputs.append(out.detach())
        if out.requires_grad:
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
            grads.append(x.grad)
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_quantizer_kind_is_numbered_once():
    """ActKind maps QuantConfig's strings to the kinds; the C++ kernel's numbers are checked in test_kernels."""
    from gaq_calc.quant import ActKind

    assert ActKind.of("scalar", "frame", 8) == ActKind.LINEAR
    assert [ActKind.of("vector", m, 8) for m in ("mddq", "frame", "cartesian", "kmeans")] == [
        ActKind.MDDQ,
        ActKind.FRAME,
        ActKind.LINEAR,
        ActKind.KMEANS,
    ]
    assert ActKind.of("vector", "frame", None) == ActKind.NONE
    with pytest.raises(ValueError, match="vector_method"):
        ActKind.of("vector", "octahedral", 8)
