"""Triton kernels of proxykern (installed as ``proxykern.kernels``)."""
