"""Fused attention forward: softmax(q k^T * scale) v without materialising the (T, T) score matrix.

Flash-attention style: each program owns BLOCK_M query rows of one (batch, head), streams the keys and
values in blocks of BLOCK_N and keeps a running row max `m`, row sum `l` and unnormalised output `acc`
(all float32). When a new block raises the max, the old `l` and `acc` are rescaled by exp(m_old - m_new),
so after the last block acc / l is the exact softmax-weighted sum. Scores are kept in base 2 (the scale is
multiplied by log2(e)) so the exponentials are `exp2`, the cheap instruction on GPUs.

Layout: q (B, H, Tq, Dh), k and v (B, H, Tk, Dh), any strides; the output is a (B, H, Tq, Dh) view of
(B, Tq, H, Dh) memory, so the caller's usual `y.transpose(1, 2).reshape(B, Tq, H * Dh)` costs no copy.
Ragged lengths are masked (keys past Tk score -inf, query rows past Tq are not stored); a head dim that is
not a power of two is zero-padded in registers (zeros add nothing to q.k nor to p.v).
"""

import math

import torch

from synthgen.kernels._triton import check_device, interpreting, next_pow2, require_triton, tl, triton

__all__ = ["attention_flops", "attention_ref", "attention_supported", "attention_triton"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E = 1.0 / math.log(2.0)  # exp(x) == exp2(x * log2(e))


# ---- Reference ----


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain softmax attention in float32, cast back to q's dtype. (B, H, Tq, Dh) x 2 (B, H, Tk, Dh)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # (B, H, Tq, Dh)


# ---- Kernel ----


@triton.jit
def _mma(a, b, acc, F32_DOT: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    F32_DOT upcasts both operands first and asks for IEEE fp32 products (no TF32). It is set for float32
    inputs (so they keep 1e-5 accuracy) and for bf16 under the CPU interpreter, whose bf16 `tl.dot` returns
    garbage in triton 3.8; a bf16 x bf16 product is exact in fp32, so the upcast changes nothing numerically.
    """
    if F32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O,
    # Strides in elements, in (batch, head, token, dim) order for every tensor; O's come from a
    # (B, T, H, Dh) buffer seen as (B, H, T, Dh).
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    so_b, so_h, so_t, so_d,
    H, T_Q, T_K, HEAD_DIM,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # one (batch, head) pair per row of the grid
    b = (bh // H).to(tl.int64)  # int64: b * stride can pass 2^31 elements on large batches
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # padding lanes of a non-power-of-two head dim

    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d  # (BLOCK_M, BLOCK_D)
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T_Q) & d_ok[None, :], other=0.0)
    # K is read transposed, (BLOCK_D, BLOCK_N), so q @ k needs no in-register transpose.
    k_ptrs = K + b * sk_b + h * sk_h + offs_n[None, :] * sk_t + offs_d[:, None] * sk_d
    v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d  # (BLOCK_N, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    for start in range(0, T_K, BLOCK_N):
        key_ok = (start + offs_n) < T_K
        k = tl.load(k_ptrs + start * sk_t, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        s = _mma(q, k, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32_DOT) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))  # keys past the end get no weight
        # Every block holds at least one real key, so m_new is finite and no exp2(-inf - -inf) NaN appears.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 on the first block)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs + start * sv_t, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        # p is rounded to v's dtype before the second product, as fp16/bf16 tensor cores need.
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], F32_DOT)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < T_Q) & d_ok[None, :])


# ---- Launcher ----


def _block_policy(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim.

    GPU: 128 query rows per program keeps the tensor cores fed at DiT lengths (256-1024 tokens); the
    key block shrinks as the head grows so q, k, v and acc stay in registers/shared memory, and float32
    halves the query block for the same reason. Interpreter: 32 x 32, since its cost is per program.
    """
    if interpreting():
        return 32, 32, 1, 1
    if head_dim <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        bm, bn, warps, stages = 128, 64, 8, 2
    else:
        bm, bn, warps, stages = 64, 32, 8, 1
    if dtype == torch.float32:
        bm = bm // 2
    return bm, bn, warps, stages


def attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel handles; the dispatcher falls back to SDPA elsewhere."""
    return (
        q.ndim == k.ndim == v.ndim == 4
        and q.dtype in DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[2] == v.shape[2]
        and q.shape[3] == k.shape[3] == v.shape[3]
        and 1 <= q.shape[3] <= MAX_HEAD_DIM
        and q.shape[2] >= 1
        and k.shape[2] >= 1
    )


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Fused attention forward. q (B, H, Tq, Dh), k/v (B, H, Tk, Dh) -> (B, H, Tq, Dh) in q's dtype.

    `out`, if given, must be (B, H, Tq, Dh) of q's dtype (any strides) and is filled and returned.
    `block_m` / `block_n` override the block policy (tests use them to force ragged tails).
    """
    require_triton("attention")
    if not attention_supported(q, k, v):
        raise ValueError(
            "attention: expected q (B, H, Tq, Dh), k and v (B, H, Tk, Dh) of one dtype in "
            f"{[str(d) for d in DTYPES]} with 1 <= Dh <= {MAX_HEAD_DIM}; got q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
        )
    check_device("attention", q, k, v)
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    if out is None:
        out = torch.empty(B, Tq, H, Dh, device=q.device, dtype=q.dtype).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)}")
    bd = max(16, next_pow2(Dh))  # tl.dot needs every block dim >= 16
    bm, bn, warps, stages = _block_policy(bd, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    scale = Dh**-0.5 if scale is None else float(scale)
    f32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    grid = (B * H, triton.cdiv(Tq, bm))
    _attention_fwd_kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Tq, Tk, Dh, scale * _LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, F32_DOT=f32_dot, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def attention_flops(B: int, H: int, Tq: int, Tk: int, Dh: int) -> int:
    """Matmul FLOPs of one forward: q k^T and p v, 2*m*n*k each."""
    return 4 * B * H * Tq * Tk * Dh

