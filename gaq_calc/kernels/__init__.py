"""Inference kernels behind one interface: "reference" (the TorchScript/eager network with autograd
forces) and "fused" (one C++ call with a hand-written backward; CPU, float32/float64)."""

from gaq_calc.kernels.fused import FusedEnergyForces, KernelUnavailable, gather_parameters, load_extension

__all__ = ["FusedEnergyForces", "KernelUnavailable", "gather_parameters", "load_extension"]
