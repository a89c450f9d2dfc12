"""Cosine filter on device: score generated embeddings against their conditions, threshold, compact.

    score[i]  = <e_i / max(|e_i|, eps), c_i / max(|c_i|, eps)>       (float32; F.normalize semantics)
    mask[i]   = score[i] >= threshold  [and valid[i]]                  NaN compares False: never accepted
    indices   = accepted row ids in increasing order, then -1 up to length B
    count     = number of accepted rows (a 0-d int64 tensor)

Everything stays on the device with static (B,) shapes, so the filter adds no host sync: the writer's one
transfer per batch reads `count` with the rest. Two launches: a row-parallel scoring kernel, then a
single-program stable compaction (a running prefix sum over the mask, one block at a time), which is
plenty for the batch sizes of a generation step.
"""

import torch
import torch.nn.functional as F

from synthgen.kernels._triton import check_device, next_pow2, require_triton, tl, triton

__all__ = ["cosine_filter_ref", "cosine_filter_supported", "cosine_filter_triton"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- Reference ----


def cosine_filter_ref(
    emb: torch.Tensor,
    cond: torch.Tensor,
    threshold: float | None = None,
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb, cond (B, D) -> (scores (B,) float32, mask (B,) bool, indices (B,) int64, count () int64)."""
    scores = (F.normalize(emb.float(), dim=1, eps=eps) * F.normalize(cond.float(), dim=1, eps=eps)).sum(dim=1)
    mask = scores >= (float("-inf") if threshold is None else threshold)  # False for NaN
    if valid is not None:
        mask = mask & valid
    return (scores, mask, *compact_ref(mask))


def compact_ref(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) bool -> (indices (B,) int64: accepted ids in order then -1, count () int64), without a host sync.

    A stable sort on "rejected" puts accepted ids first in their original order; `nonzero` would be simpler
    but has a data-dependent shape, which forces a device-to-host sync.
    """
    order = torch.sort((~mask).to(torch.uint8), stable=True).indices  # (B,) int64
    count = mask.sum()
    rank = torch.arange(mask.shape[0], device=mask.device)
    return torch.where(rank < count, order, torch.full_like(order, -1)), count


# ---- Kernels ----


@triton.jit
def _cosine_score_kernel(
    E, C, VALID, SCORES, MASK,
    B, D,
    se_b, se_d, sc_b, sc_d,  # (row, column) strides of emb and cond, in elements
    eps, threshold,
    HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dot = tl.zeros([BLOCK_B], tl.float32)
    ee = tl.zeros([BLOCK_B], tl.float32)  # |e|^2
    cc = tl.zeros([BLOCK_B], tl.float32)  # |c|^2
    for start in range(0, D, BLOCK_D):  # walk the embedding dim in chunks; the three sums are all we keep
        cols = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols[None, :] < D)
        e = tl.load(E + rows64[:, None] * se_b + cols[None, :] * se_d, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(C + rows64[:, None] * sc_b + cols[None, :] * sc_d, mask=ok, other=0.0).to(tl.float32)
        dot += tl.sum(e * c, axis=1)
        ee += tl.sum(e * e, axis=1)
        cc += tl.sum(c * c, axis=1)
    score = dot / (tl.maximum(tl.sqrt(ee), eps) * tl.maximum(tl.sqrt(cc), eps))
    keep = score >= threshold  # an ordered compare: a NaN score (NaN/Inf input) is never kept
    if HAS_VALID:
        keep = keep & (tl.load(VALID + rows, mask=row_ok, other=0) != 0)
    tl.store(SCORES + rows, score, mask=row_ok)
    tl.store(MASK + rows, keep.to(tl.int8), mask=row_ok)


@triton.jit
def _compact_kernel(MASK, INDICES, COUNT, B, BLOCK: tl.constexpr):
    # One program walks the mask in blocks; `total` carries the number accepted so far, so each accepted
    # row's slot is total + (its rank inside the block).
    total = tl.zeros([], tl.int32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        keep = tl.load(MASK + offs, mask=offs < B, other=0) != 0
        keep_i = keep.to(tl.int32)
        slot = total + tl.cumsum(keep_i, axis=0) - 1
        tl.store(INDICES + slot, offs.to(tl.int64), mask=keep)
        total += tl.sum(keep_i, axis=0)
    # The tail [total, B) gets -1, so every element of the output is written (slots above are < total).
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(INDICES + offs, tl.full([BLOCK], -1, tl.int64), mask=(offs >= total) & (offs < B))
    tl.store(COUNT, total.to(tl.int64))


# ---- Launcher ----


def cosine_filter_supported(emb: torch.Tensor, cond: torch.Tensor) -> bool:
    return (
        emb.ndim == 2
        and emb.shape == cond.shape
        and emb.shape[0] >= 1
        and emb.shape[1] >= 1
        and emb.dtype in DTYPES
        and cond.dtype in DTYPES
    )


def cosine_filter_triton(
    emb: torch.Tensor,
    cond: torch.Tensor,
    threshold: float | None = None,
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block_b: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb, cond (B, D) -> (scores (B,) float32, mask (B,) bool, indices (B,) int64, count () int64).

    `valid` (B,) bool marks rows that may be kept at all (e.g. finite images, real rather than padding).
    `out` is an optional preallocated (scores, mask, indices, count) tuple of those shapes and dtypes.
    """
    require_triton("cosine_filter")
    if not cosine_filter_supported(emb, cond):
        raise ValueError(
            f"cosine_filter: expected emb and cond (B, D) of one shape in {[str(d) for d in DTYPES]}; got "
            f"{tuple(emb.shape)} {emb.dtype} and {tuple(cond.shape)} {cond.dtype}"
        )
    B, D = emb.shape
    if valid is not None and (valid.shape != (B,) or valid.dtype != torch.bool):
        raise ValueError(f"cosine_filter: valid must be ({B},) bool, got {tuple(valid.shape)} {valid.dtype}")
    check_device("cosine_filter", emb, cond, *([valid] if valid is not None else []))
    dev = emb.device
    if out is None:
        out = (
            torch.empty(B, device=dev, dtype=torch.float32),
            torch.empty(B, device=dev, dtype=torch.bool),
            torch.empty(B, device=dev, dtype=torch.int64),
            torch.empty((), device=dev, dtype=torch.int64),
        )
    scores, mask, indices, count = out
    bd = min(256, next_pow2(D))
    bb = block_b or max(1, min(64, 4096 // bd))
    thr = float("-inf") if threshold is None else float(threshold)
    _cosine_score_kernel[(triton.cdiv(B, bb),)](
        emb, cond, valid if valid is not None else mask, scores, mask.view(torch.int8),
        B, D, *emb.stride(), *cond.stride(), float(eps), thr,
        HAS_VALID=valid is not None, BLOCK_B=bb, BLOCK_D=bd,
    )  # fmt: skip
    _compact_kernel[(1,)](mask.view(torch.int8), indices, count, B, BLOCK=min(1024, next_pow2(B)))
    return scores, mask, indices, count
