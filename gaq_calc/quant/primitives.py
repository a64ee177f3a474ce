"""Quantization primitives: pure functions, no model code, and the one place each rounding is written.

- symmetric linear quantization (2-16 bits) with a straight-through estimator and LSQ step-size grads;
- spherical codebooks for unit directions, with their covering radius;
- the Geometric STE: nearest codeword forward, tangent-plane projection (I - u u^T) g backward;
- MDDQ: v -> Q_m(|v|) * Q_d(v / |v|), safe at v = 0;
- linear rounding in an equivariant local frame (exactly equivariant l=1 rounding);
- nearest k-means centroid (the SVQ-KMeans baseline).

Every rounding function is TorchScript-compatible: QAT (quant.modules), the exported artifact (which
scripts the same activation quantizers) and the fused kernel's Python side all call these. Only the
codebook builders (`fibonacci_sphere`, `covering_radius`, `kmeans_centroids`) are eager-only: they run
when a model is built or calibrated, never inside a network.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch


def qrange(bits: int) -> Tuple[int, int]:
    """Signed symmetric integer range: [-(2^(b-1) - 1), 2^(b-1) - 1] (the zero point stays exact)."""
    if not 2 <= bits <= 16:  # above 8 only for fake quantization (analysis); codes are int8
        raise ValueError("bits must lie in [2, 16], not " + str(bits))
    q = (1 << (bits - 1)) - 1
    return -q, q


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward (bit-exact), identity backward."""
    return torch.round(x).detach() + (x - x.detach())


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward x (bit-exact), backward grad * scale (LSQ's step-size gradient scaling)."""
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def positive(step: torch.Tensor) -> torch.Tensor:
    """Learned steps are used by magnitude and never reach zero (x / step stays finite)."""
    return step.abs().clamp_min(1e-12)


def lsq_grad_scale(n_elements: float, qmax: int) -> float:
    """LSQ's step-gradient scale 1 / sqrt(N * qmax), N = elements sharing one step (Esser et al. 2020). An
    empty input (a structure without edges) gives the step no gradient at all, so any finite scale does."""
    return 1.0 / math.sqrt(max(n_elements, 1.0) * qmax)


def fake_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, lsq: bool = True) -> torch.Tensor:
    """Symmetric linear fake quantization: step * clamp(round(x / step)).

    step broadcasts against x (per-tensor or per-channel). With lsq=True the step receives the LSQ
    gradient scaled by 1 / sqrt(N * qmax), N = elements sharing one step; x gets the clipped
    straight-through estimator.
    """
    qmin, qmax = qrange(bits)
    step = positive(step)
    if lsq:
        step = grad_scale(step, lsq_grad_scale(x.numel() / step.numel(), qmax))
    return round_ste(torch.clamp(x / step, qmin, qmax)) * step


def quantize_int(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes of fake_quantize (int8 storage for every bit width up to 8)."""
    if bits > 8:
        raise ValueError("integer codes are int8: bits must be <= 8, not " + str(bits))
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / positive(step)), qmin, qmax).to(torch.int8)


# ---- spherical codebooks ------------------------------------------------------------------------------


def fibonacci_sphere(n: int) -> np.ndarray:
    """n near-uniform unit vectors on the golden-angle spiral, [n, 3] float64.

    Chosen because it exists for every n (so the codebook size can follow the bit width exactly,
    n = 2^bits), is deterministic, and has a covering radius within a few percent of the best known
    spherical codes, whereas regular polyhedra stop at 20 vertices.
    """
    if n < 4:
        raise ValueError("a spherical codebook needs at least 4 points")
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    r = np.sqrt(1.0 - z * z)
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def covering_radius(codebook: np.ndarray) -> float:
    """Exact covering radius (radians): the largest angle from any direction to its nearest codeword.

    The farthest points from a finite set on S^2 are vertices of its spherical Voronoi diagram.
    """
    from scipy.spatial import SphericalVoronoi

    vertices = SphericalVoronoi(codebook, radius=1.0).vertices
    cos = np.clip(vertices @ codebook.T, -1.0, 1.0).max(axis=1)
    return float(np.arccos(cos).max())


def quantize_direction(u: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Q_d with the Geometric STE: the nearest codeword of u [..., 3] (unit vectors) in angle, codebook
    [K, 3]; the gradient is projected onto the tangent plane at u, (I - u u^T) g (Prop. III.1).

    The projection is written as a term that is exactly zero forward, (u - u0) - u0 <u - u0, u0> with
    u0 = u detached, so autograd (eager and TorchScript) differentiates it without a custom Function."""
    u0 = u.detach()
    index = torch.argmax(u0 @ codebook.t(), dim=-1)  # nearest in angle = largest cosine
    nearest = codebook.index_select(0, index.reshape(-1)).reshape(u0.shape)
    tangent = (u - u0) - u0 * ((u - u0) * u0).sum(-1, keepdim=True)
    return nearest + tangent


def mddq(
    v: torch.Tensor,  # [..., 3] vectors (the component axis is the last one)
    codebook: torch.Tensor,  # [K, 3]
    magnitude_step: torch.Tensor,
    magnitude_bits: int,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Magnitude-direction decoupled quantization: Q_m(|v|) * Q_d(v / |v|).

    Q_m is an unsigned linear quantizer on [0, (2^b - 1) * step]; a zero vector maps to zero exactly
    (its direction is irrelevant because its quantized magnitude is 0).
    """
    norm = torch.sqrt((v * v).sum(-1, keepdim=True) + eps * eps)  # [..., 1], smooth at 0
    levels = (1 << magnitude_bits) - 1
    step = grad_scale(positive(magnitude_step), lsq_grad_scale(float(norm.numel()), levels))
    magnitude = round_ste(torch.clamp(norm / step, 0, levels)) * step
    return magnitude * quantize_direction(v / norm, codebook)


# ---- equivariant local frames (beyond the paper) ------------------------------------------------------


def local_frame(v: torch.Tensor, rel_tol: float = 1e-7) -> torch.Tensor:
    """A right-handed orthonormal frame per feature set, built from the vectors themselves.

    v [..., 3, C] (C channels of l=1 vectors) -> frame [..., 3, 3] whose rows are e1, e2, e3:
    e1 = the channel of largest norm, e2 = the channel with the largest component orthogonal to e1
    (Gram-Schmidt), e3 = e1 x e2. Channel choice depends on invariants only (norms), so the frame of
    R v is R's image of the frame of v: components in it are rotation invariant.
    Degenerate sets fall back: all-zero -> identity (every component is 0 anyway); collinear to within
    rel_tol -> any e2 perpendicular to e1 (the components along e2, e3 are below rel_tol |v| and round
    to 0 inside the calibrated range; only this case is not exactly equivariant).
    """
    lead = v.shape[:-2]
    flat = v.reshape(-1, 3, v.shape[-1])  # [m, 3, C]
    m = flat.shape[0]
    norms = torch.linalg.vector_norm(flat, dim=1)  # [m, C]
    first = flat.gather(2, norms.argmax(1).view(m, 1, 1).expand(m, 3, 1)).squeeze(2)  # [m, 3]
    first_norm = torch.linalg.vector_norm(first, dim=1, keepdim=True)  # [m, 1]
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    e1 = torch.where(first_norm > 0, first / first_norm.clamp_min(1e-30), eye[0].expand(m, 3))  # [m, 3]
    perp = flat - e1.unsqueeze(2) * (e1.unsqueeze(2) * flat).sum(1, keepdim=True)  # [m, 3, C]
    largest = torch.linalg.vector_norm(perp, dim=1).argmax(1)  # [m]
    second = perp.gather(2, largest.view(m, 1, 1).expand(m, 3, 1)).squeeze(2)  # [m, 3]
    second_norm = torch.linalg.vector_norm(second, dim=1, keepdim=True)
    # fallback e2: perpendicular to e1 and to the Cartesian axis least aligned with it
    fallback = torch.linalg.cross(e1, eye.index_select(0, e1.abs().argmin(1)))
    fallback = fallback / torch.linalg.vector_norm(fallback, dim=1, keepdim=True)
    e2 = torch.where(second_norm > rel_tol * first_norm, second / second_norm.clamp_min(1e-30), fallback)
    e3 = torch.linalg.cross(e1, e2)
    shape: list[int] = list(lead) + [3, 3]
    return torch.stack([e1, e2, e3], dim=1).reshape(shape)  # [..., 3, 3]


def frame_quantize(v: torch.Tensor, step: torch.Tensor, bits: int, lsq: bool = True) -> torch.Tensor:
    """Rotation-equivariant linear quantization of l=1 features v [..., 3, C].

    Components are taken in the local frame of v (rotation invariant), fake-quantized linearly, and
    rotated back: Q(R v) = R Q(v) for every rotation R, up to float rounding in building the frame.
    The frame is a constant for autograd, so the straight-through gradient w.r.t. v is the identity
    (inside the clipping range) and the step gets its LSQ gradient.
    """
    frame = local_frame(v.detach())  # [..., 3, 3]
    components = frame @ v  # [..., 3, C] invariant
    return frame.transpose(-1, -2) @ fake_quantize(components, step, bits, lsq)


# ---- k-means vector codebook (the SVQ-KMeans baseline) --------------------------------------------------


def kmeans_centroids(data: torch.Tensor, k: int, seed: int = 0, iterations: int = 25) -> torch.Tensor:
    """Lloyd's k-means on data [n, d], seeded by k-means++ (D^2 sampling)."""
    gen = torch.Generator().manual_seed(seed)
    if len(data) < k:
        raise ValueError(f"k-means needs at least {k} samples, got {len(data)}")
    chosen = [int(torch.randint(len(data), (1,), generator=gen))]
    dist2 = ((data - data[chosen[0]]) ** 2).sum(-1)  # [n]
    for _ in range(k - 1):
        weights = dist2 if float(dist2.sum()) > 0 else torch.ones_like(dist2)
        chosen.append(int(torch.multinomial(weights, 1, generator=gen)))
        dist2 = torch.minimum(dist2, ((data - data[chosen[-1]]) ** 2).sum(-1))
    centroids = data[chosen].clone()  # [k, d]
    for _ in range(iterations):
        assign = torch.cdist(data, centroids).argmin(-1)  # [n]
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def nearest_centroid(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Hard assignment of v [..., 3] to its nearest codeword: no gradient flows through it."""
    flat = v.detach().reshape(-1, v.shape[-1])
    return codebook.index_select(0, torch.cdist(flat, codebook).argmin(-1)).reshape(v.shape)
