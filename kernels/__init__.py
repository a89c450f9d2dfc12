"""Triton kernels, each beside its plain-PyTorch reference (see DESIGN.md)."""
