"""Two signed 4-bit codes per byte (low nibble first). TorchScript-compatible."""

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], shape [out, in] -> uint8 [out, ceil(in / 2)]."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError("pack_int4 takes a 2-D int8 tensor")
    if bool((codes < -8).any()) or bool((codes > 7).any()):
        raise ValueError("4-bit codes must lie in [-8, 7]")
    out, n = codes.shape
    padded = torch.zeros((out, n + n % 2), dtype=torch.int16)
    padded[:, :n] = codes.to(torch.int16) & 0xF  # two's-complement nibbles
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [out, ceil(in / 2)] -> int8 [out, in]."""
    p = packed.to(torch.int16)
    nibbles = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=2).reshape(p.shape[0], -1)[:, :in_features]
    return ((nibbles ^ 8) - 8).to(torch.int8)  # sign-extend 4 bits
