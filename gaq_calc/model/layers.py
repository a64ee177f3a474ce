"""One transformer layer: cosine attention on the scalar branch, equivariant messages on the vector branch.

Features: scalars h [n_atoms, F] (l=0) and vectors v [n_atoms, 3, F] (l=1, Cartesian x, y, z).
Every Linear acting on vectors mixes channels only (last dim, no bias), so it commutes with rotations.
The scalar and vector branches use separate, named Linear modules so that quantizers attach by name:
    scalar branch: qk_proj, value_proj, exchange_in, exchange_out
    vector branch: vector_mix
"""

import torch
from torch import nn


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of src into dim_size rows given by index (first dim)."""
    size = src.size()
    shape = [dim_size] + [size[d] for d in range(1, len(size))]  # (same in eager and TorchScript)
    out = torch.zeros(shape, dtype=src.dtype, device=src.device)
    return out.index_add(0, index, src)


class EquivariantAttentionLayer(nn.Module):
    def __init__(self, num_features: int, num_heads: int, tau_init: float):
        super().__init__()
        if num_features % num_heads != 0:
            raise ValueError("num_features must be divisible by num_heads")
        F = num_features
        self.num_features = F
        self.num_heads = num_heads
        self.head_dim = F // num_heads
        # scalar branch
        self.norm = nn.LayerNorm(F)
        self.qk_proj = nn.Linear(F, 2 * F, bias=False)  # queries and keys
        self.value_proj = nn.Linear(F, 2 * F)  # values of the scalar->vector and of the scalar message
        self.log_tau = nn.Parameter(torch.full((num_heads,), float(tau_init)).log())
        self.exchange_in = nn.Linear(2 * F, F)
        self.exchange_out = nn.Linear(F, 3 * F)
        # vector branch
        self.vector_mix = nn.Linear(F, 2 * F, bias=False)

    def forward(
        self,
        h: torch.Tensor,  # [n, F]
        v: torch.Tensor,  # [n, 3, F]
        filters: torch.Tensor,  # [E, 3F] radial filters (scalar->vector, scalar, vector->vector)
        attn_bias: torch.Tensor,  # [E, H] invariant pair encoding, <= 0
        envelope: torch.Tensor,  # [E]
        sph4: torch.Tensor,  # [E, 4] (0, Y_1(r_ij)): l=1 spherical harmonics behind a zero
        receivers: torch.Tensor,  # [E]
        senders: torch.Tensor,  # [E]
    ):
        n, F, H, D = h.shape[0], self.num_features, self.num_heads, self.head_dim
        E = receivers.shape[0]
        x = self.norm(h)

        # attention weights from invariants only: cosine of L2-normalised queries and keys
        qk = nn.functional.normalize(self.qk_proj(x).view(n, 2, H, D), dim=-1)  # [n, 2, H, D]
        q, k = qk.unbind(1)  # (unbind/split, not slicing: their backward is a cat, not a zero fill)
        cos = (q.index_select(0, receivers) * k.index_select(0, senders)).sum(-1)  # [E, H]
        # smooth in the geometry: each weight carries the envelope, and the "+1" sink keeps the
        # normaliser away from zero, so a neighbour leaving the cutoff fades out continuously
        score = envelope[:, None] * torch.exp(self.log_tau.exp() * (cos - 1.0) + attn_bias)  # [E, H]
        alpha = score / (1.0 + scatter_sum(score, receivers, n)).index_select(0, receivers)  # [E, H]
        gates = (filters.view(E, 3, H, D) * alpha.view(E, 1, H, 1)).view(E, 3, F)  # [E, 3, F]

        # one gather of everything a sender contributes: [value_sv, value_s, v_x, v_y, v_z]
        node = torch.cat([self.value_proj(x).view(n, 2, F), v], dim=1)  # [n, 5, F]
        src_sv, src = node.index_select(0, senders).split([1, 4], dim=1)  # [E, 1, F], [E, 4, F]
        g_sv, g_s, g_vv = gates.split(1, dim=1)  # each [E, 1, F]
        # messages [E, 4, F] = (scalar, vector x, y, z); rows 1..3 are equivariant
        weights = torch.cat([g_s, g_vv.expand(E, 3, F)], dim=1)  # [E, 4, F]
        msg = weights * src + (g_sv * src_sv) * sph4[:, :, None]
        agg_s, agg_v = scatter_sum(msg, receivers, n).split([1, 3], dim=1)  # [n, 1, F], [n, 3, F]
        h = h + agg_s.squeeze(1)
        v = v + agg_v

        # per-atom exchange between the branches through invariants (PaiNN-style update)
        v_u, v_w = self.vector_mix(v).split(F, dim=-1)  # [n, 3, F] each
        v_norm = torch.sqrt((v_w * v_w).sum(1) + 1.0) - 1.0  # [n, F], smooth at v = 0
        a = self.exchange_out(nn.functional.silu(self.exchange_in(torch.cat([self.norm(h), v_norm], -1))))
        a_vv, a_sv, a_ss = a.split(F, dim=-1)
        h = h + a_ss + a_sv * (v_u * v_w).sum(1)
        v = v + a_vv[:, None, :] * v_u
        return h, v
