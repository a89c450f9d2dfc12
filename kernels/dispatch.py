"""One entry point per fused op: the Triton kernel where it can run, the PyTorch reference elsewhere.

Rule (`use_triton`): the kernel runs on CUDA tensors when Triton is installed, and on CPU tensors only
under the Triton interpreter (TRITON_INTERPRET=1) with an explicit opt-in, either the environment
variable SYNTHGEN_KERNELS=triton or the `triton_kernels()` context manager (tests). The reference always
runs while exporting to ONNX, tracing, or compiling with torch.compile (the graph must see plain torch
ops), when autograd would need a backward (the kernels are forward-only), and for shapes or dtypes a
kernel does not cover. SYNTHGEN_KERNELS=torch, or `triton_kernels(False)`, forces the reference
everywhere, e.g. to time a denoiser step with and without the kernels.

Nothing launches or compiles at import; the Triton functions are only defined.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch
import torch.nn.functional as F

from synthgen.kernels import adaln as _adaln
from synthgen.kernels import attention as _attention
from synthgen.kernels import filter as _filter
from synthgen.kernels import guidance_step as _guidance
from synthgen.kernels._triton import HAS_TRITON, interpreting

__all__ = [
    "HAS_TRITON",
    "attention",
    "cosine_filter",
    "gated_residual",
    "guided_step",
    "layernorm_modulate",
    "triton_kernels",
    "use_triton",
]

ENV_VAR = "SYNTHGEN_KERNELS"
CHOICES = ("auto", "triton", "torch")

# Set by `triton_kernels`: None defers to the environment, True/False force a choice in this context.
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("synthgen_kernels", default=None)


@contextlib.contextmanager
def triton_kernels(enabled: bool = True) -> Iterator[None]:
    """Force the kernels on (CPU tensors too, when interpreting) or off inside the block."""
    token = _override.set(bool(enabled))
    try:
        yield
    finally:
        _override.reset(token)


def _choice() -> str:
    forced = _override.get()
    if forced is not None:
        return "triton" if forced else "torch"
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}; unset it or pick one")
    return value


def _graph_capture() -> bool:
    """Export, tracing and compile see plain torch ops: Triton launches are opaque to them."""
    return (
        torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel should run on these tensors (the first one decides the device)."""
    if not HAS_TRITON or _graph_capture():
        return False
    choice = _choice()
    if choice == "torch":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # forward-only kernels: training keeps autograd's reference path
    device = tensors[0].device.type
    if device == "cuda":
        return True
    return device == "cpu" and interpreting() and choice == "triton"


# ---- Public ops ----


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Tq, Dh), k/v (B, H, Tk, Dh); scale defaults to Dh^-0.5.

    The fallback is torch's SDPA (its own fused kernels per device), not the float32 `attention_ref`
    oracle, so the unfused model is exactly what it was before the kernels existed.
    """
    if use_triton(q, k, v) and _attention.attention_supported(q, k, v):
        return _attention.attention_triton(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift: x (B, T, D), shift/scale (B, D) -> (B, T, D)."""
    if use_triton(x, shift, scale) and _adaln.adaln_supported(x, shift, scale):
        return _adaln.layernorm_modulate_triton(x, shift, scale, eps)
    return _adaln.layernorm_modulate_ref(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y: x, y (B, T, D), gate (B, D) -> (B, T, D)."""
    if use_triton(x, gate, y) and _adaln.adaln_supported(x, gate) and y.shape == x.shape and y.dtype == x.dtype:
        return _adaln.gated_residual_triton(x, gate, y)
    return _adaln.gated_residual_ref(x, gate, y)


def guided_step(
    plan,
    k: int,
    x: torch.Tensor,
    out_cond: torch.Tensor,
    out_uncond: torch.Tensor | None = None,
    cfg: float | torch.Tensor = 1.0,
    prev_x0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG combine + step k of a SamplerPlan in one pass -> (x_next, x0), shaped and typed like x.

    m = out_uncond + cfg * (out_cond - out_uncond) (or out_cond when out_uncond is None), then exactly
    `synthgen.samplers.sampler_step(plan, k, x, m, prev_x0, noise)`.
    """
    tensors = [t for t in (x, out_cond, out_uncond, prev_x0, noise) if t is not None]
    if use_triton(*tensors) and _guidance.guided_step_supported(x, out_cond, out_uncond, prev_x0, noise):
        return _guidance.guided_step_triton(plan, k, x, out_cond, out_uncond, cfg, prev_x0, noise)
    return _guidance.guided_step_ref(plan, k, x, out_cond, out_uncond, cfg, prev_x0, noise)


def cosine_filter(
    emb: torch.Tensor,
    cond: torch.Tensor,
    threshold: float | None = None,
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb, cond (B, D) -> (scores (B,) float32, mask (B,) bool, indices (B,) int64, count () int64).

    indices holds the accepted row ids in order, then -1; NaN scores are never accepted. No host sync.
    """
    if use_triton(emb, cond) and _filter.cosine_filter_supported(emb, cond):
        return _filter.cosine_filter_triton(emb, cond, threshold, valid, eps)
    return _filter.cosine_filter_ref(emb, cond, threshold, valid, eps)
