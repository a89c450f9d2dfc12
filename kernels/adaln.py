"""Fused adaLN conditioning for DiT blocks: LayerNorm + modulation in one pass, and the gated residual.

    layernorm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale) + shift     (no affine LayerNorm)
    gated_residual(x, gate, y)          = x + gate * y

x and y are (B, T, D) token tensors; shift, scale and gate are (B, D) per-sample vectors (chunks of the
adaLN projection of the conditioning, computed once per block per step) broadcast over the T tokens.
Unfused, each line is 3-4 elementwise kernels that each read and write the whole (B, T, D) tensor; fused,
x (and y) are read once and the result written once, with the statistics and arithmetic in float32.
"""

import torch
import torch.nn.functional as F

from synthgen.kernels._triton import check_device, next_pow2, require_triton, tl, triton

__all__ = [
    "adaln_supported",
    "gated_residual_ref",
    "gated_residual_triton",
    "layernorm_modulate_ref",
    "layernorm_modulate_triton",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 16384  # one row must fit in one program's registers


# ---- References ----


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x (B, T, D), shift/scale (B, D) -> (B, T, D). The exact ops of the unfused DiT block."""
    # int(): a traced size would be a tensor, which the TorchScript ONNX exporter cannot take as a shape.
    normed = F.layer_norm(x, (int(x.shape[-1]),), None, None, eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), gate (B, D), y (B, T, D) -> x + gate * y, (B, T, D)."""
    return x + gate[:, None] * y


# ---- Kernels ----


@triton.jit
def _layernorm_modulate_kernel(
    X, SHIFT, SCALE, OUT,
    n_rows, T, D,  # x seen as (n_rows = B * T, D); row r belongs to sample r // T
    sx_row, sshift_b, sscale_b, so_row,  # row strides; the D axis is contiguous in every tensor
    eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # BLOCK_R whole rows per program
    cols = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < D)  # (BLOCK_R, BLOCK_D)
    rows64 = rows.to(tl.int64)  # row * stride can pass 2^31 on large batches

    x = tl.load(X + rows64[:, None] * sx_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    # Two-pass statistics over the row held in registers: as accurate as torch's and no extra memory traffic.
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)  # padding lanes must not add to the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)

    sample = (rows64 // T)[:, None]  # which (B, D) modulation row each token row uses
    shift = tl.load(SHIFT + sample * sshift_b + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + sample * sscale_b + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(OUT + rows64[:, None] * so_row + cols[None, :], y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_residual_kernel(
    X, GATE, Y, OUT,
    n, TD, D,  # n = B * T * D elements of contiguous x, y, out; element i is sample i // TD, channel i % D
    sgate_b,  # row stride of gate (B, D); its D axis is contiguous
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    # The gate is tiny and re-read by every token of its sample: it stays in L1/L2.
    g = tl.load(GATE + (offs // TD) * sgate_b + offs % D, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x + g * y).to(OUT.dtype.element_ty), mask=ok)


# ---- Launchers ----


def adaln_supported(x: torch.Tensor, *vectors: torch.Tensor) -> bool:
    """x (B, T, D) in a supported dtype with (B, D) vectors of the same dtype; else the dispatcher uses torch."""
    return (
        x.ndim == 3
        and x.dtype in DTYPES
        and 1 <= x.shape[-1] <= MAX_DIM
        and all(v.shape == (x.shape[0], x.shape[2]) and v.dtype == x.dtype for v in vectors)
    )


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, T, D) viewable as (B*T, D) with contiguous rows: returned as is, else copied once."""
    B, T, D = t.shape
    if t.stride(2) == 1 and (B == 1 or T == 1 or t.stride(0) == T * t.stride(1)):
        return t
    return t.contiguous()


def _unit_stride(v: torch.Tensor) -> torch.Tensor:
    """(B, D) vector, usually a chunk of the (B, k*D) adaLN output: keep the view if D is contiguous."""
    return v if v.stride(1) == 1 or v.shape[1] == 1 else v.contiguous()


def _check(op: str, x: torch.Tensor, *vectors: torch.Tensor) -> None:
    require_triton(op)
    if not adaln_supported(x, *vectors):
        raise ValueError(
            f"{op}: expected x (B, T, D) with 1 <= D <= {MAX_DIM} in {[str(d) for d in DTYPES]} and (B, D) "
            f"vectors of x's dtype; got x {tuple(x.shape)} {x.dtype}, "
            f"vectors {[(tuple(v.shape), str(v.dtype)) for v in vectors]}"
        )
    check_device(op, x, *vectors)


def layernorm_modulate_triton(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift in one pass. x (B, T, D), shift/scale (B, D) -> (B, T, D)."""
    _check("layernorm_modulate", x, shift, scale)
    x, shift, scale = _as_rows(x), _unit_stride(shift), _unit_stride(scale)
    B, T, D = x.shape
    out = torch.empty(B, T, D, device=x.device, dtype=x.dtype) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"layernorm_modulate: out must be contiguous {tuple(x.shape)} {x.dtype}")
    bd = next_pow2(D)
    # About 4K elements per program: several short rows share one program, a long row gets it alone.
    br = block_rows or max(1, min(64, 4096 // bd))
    _layernorm_modulate_kernel[(triton.cdiv(B * T, br),)](
        x, shift, scale, out, B * T, T, D, x.stride(1), shift.stride(0), scale.stride(0), D, float(eps),
        BLOCK_R=br, BLOCK_D=bd, num_warps=4 if br * bd <= 4096 else 8,
    )  # fmt: skip
    return out


def gated_residual_triton(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """x + gate * y in one pass. x, y (B, T, D), gate (B, D) -> (B, T, D)."""
    _check("gated_residual", x, gate)
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"gated_residual: y must match x {tuple(x.shape)} {x.dtype}, got {tuple(y.shape)} {y.dtype}")
    check_device("gated_residual", x, y)
    x, y, gate = x.contiguous(), y.contiguous(), _unit_stride(gate)
    B, T, D = x.shape
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gated_residual: out must be contiguous {tuple(x.shape)} {x.dtype}")
    n = x.numel()
    _gated_residual_kernel[(triton.cdiv(n, block),)](x, gate, y, out, n, T * D, D, gate.stride(0), BLOCK=block)
    return out
