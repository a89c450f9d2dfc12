"""Triton as an optional dependency: `HAS_TRITON`, and stand-ins so the references import without it.

Every kernel module imports `triton` and `tl` from here. Without Triton the `@triton.jit` functions stay
plain (never launched: launchers call `require_triton()` first) and the `<op>_ref` functions still work.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Missing:
        """Just enough of `triton` / `triton.language` for the kernel modules to be defined."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Missing()

__all__ = ["HAS_TRITON", "check_device", "interpreting", "next_pow2", "require_triton", "tl", "triton"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (must be set before the kernels were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; use the reference path (synthgen.kernels.{op})")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def check_device(op: str, *tensors) -> None:
    """Launch-time device rule: CUDA tensors, or CPU tensors under the interpreter, all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = next(iter(devices))
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {dev}"
        )
