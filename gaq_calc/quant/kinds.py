"""The activation-quantizer kinds, numbered once for QAT, the artifact and the fused C++ kernel.

The fused kernel (kernels/fused_cpu.cpp) receives a kind per Linear as a number and knows NONE, LINEAR
and FRAME; kernels/fused.py passes these values and tests/test_kernels.py checks that the C++ source
numbers them the same way. QuantConfig keeps its user-facing strings (`vector_method`, stored in model
files and artifact metadata as JSON); `ActKind.of` maps them to a kind, and nothing else does.
"""

from __future__ import annotations

import enum
from typing import Optional


class ActKind(enum.IntEnum):
    NONE = 0  # inputs not rounded
    LINEAR = 1  # per-tensor symmetric linear: scalar branch, and l=1 component-wise ("cartesian")
    FRAME = 2  # linear on the components in the equivariant local frame (l=1)
    MDDQ = 3  # magnitude times nearest codeword direction (l=1); reference path only
    KMEANS = 4  # nearest k-means centroid (l=1, the SVQ-KMeans baseline); QAT only, not exportable

    @classmethod
    def of(cls, branch: str, vector_method: str, act_bits: Optional[int]) -> ActKind:
        """The kind of a Linear's input quantizer from its branch and the QuantConfig."""
        if branch not in ("scalar", "vector"):
            raise ValueError(f"branch must be 'scalar' or 'vector', not {branch!r}")
        if vector_method not in VECTOR_METHODS:
            raise ValueError(f"vector_method must be one of {tuple(VECTOR_METHODS)}, not {vector_method!r}")
        if act_bits is None:
            return cls.NONE
        return VECTOR_METHODS[vector_method] if branch == "vector" else cls.LINEAR


#: QuantConfig.vector_method -> the kind of the vector branch's input quantizer
VECTOR_METHODS = {"mddq": ActKind.MDDQ, "frame": ActKind.FRAME, "cartesian": ActKind.LINEAR,
                  "kmeans": ActKind.KMEANS}  # fmt: skip

#: kinds the fused kernel rounds itself (the others run on the reference path)
FUSED_KINDS = (ActKind.NONE, ActKind.LINEAR, ActKind.FRAME)
