"""Fused cosine filter (scores, threshold, compaction) vs its reference; NaN never passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthgen.kernels.filter import cosine_filter_ref, cosine_filter_triton

# Scores are float32 math on the (rounded) inputs in both paths, so every dtype meets the float32 tolerance.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _poisoned(B):
    return (
        torch.full((B,), float("nan")),
        torch.full((B,), 2, dtype=torch.uint8).view(torch.bool),  # neither True (1) nor False (0)
        torch.full((B,), 12345, dtype=torch.int64),
        torch.full((), 999, dtype=torch.int64),
    )


def _pairs(B, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g)
    cond = emb + 1.2 * torch.randn(B, D, generator=g)  # cosines spread around ~0.6
    return emb.to(dtype), cond.to(dtype)


def _check(got, want) -> None:
    scores, mask, indices, count = got
    assert mask.view(torch.uint8).le(1).all(), "mask has unwritten elements"
    torch.testing.assert_close(scores, want[0], atol=1e-6, rtol=1e-6, equal_nan=True)
    assert torch.equal(mask, want[1])
    assert torch.equal(indices, want[2])
    assert count.dtype == torch.int64 and count.shape == () and int(count) == int(want[3])
    assert torch.equal(indices[: int(count)], mask.nonzero().flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, D", [(1, 8), (7, 33), (130, 384)])
def test_matches_reference(B, D, dtype) -> None:
    emb, cond = _pairs(B, D, seed=B + D, dtype=dtype)
    got = cosine_filter_triton(emb, cond, 0.55, out=_poisoned(B), block_b=16)
    _check(got, cosine_filter_ref(emb, cond, 0.55))
    torch.testing.assert_close(got[0], F.cosine_similarity(emb.float(), cond.float(), dim=1), atol=1e-6, rtol=1e-6)


def test_compaction_across_blocks_and_valid_mask() -> None:
    B = 1100  # more than one 1024-block of the compaction walk
    emb, cond = _pairs(B, 16, seed=1)
    valid = torch.rand(B, generator=torch.Generator().manual_seed(2)) > 0.1
    got = cosine_filter_triton(emb, cond, 0.5, valid, out=_poisoned(B), block_b=64)
    _check(got, cosine_filter_ref(emb, cond, 0.5, valid))
    assert 0 < int(got[3]) < B


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on the NaN rows
def test_nan_and_inf_never_pass() -> None:
    emb, cond = _pairs(6, 24, seed=3)
    cond[:] = emb  # every clean row scores 1.0
    emb[1, 3] = float("nan")
    cond[2, 0] = float("nan")
    emb[3, 5] = float("inf")
    cond[4] = float("-inf")
    for threshold in (None, -1.0, 0.9):
        scores, mask, indices, count = cosine_filter_triton(emb, cond, threshold, out=_poisoned(6))
        assert mask.tolist() == [True, False, False, False, False, True]
        assert indices.tolist() == [0, 5, -1, -1, -1, -1] and int(count) == 2
        assert scores[1:5].isnan().all()


def test_zero_vectors_score_zero_not_nan() -> None:
    emb, cond = torch.zeros(2, 8), torch.randn(2, 8)
    scores, mask, _, count = cosine_filter_triton(emb, cond, 0.0)
    assert torch.equal(scores, torch.zeros(2)) and mask.all() and int(count) == 2


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        cosine_filter_triton(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="valid"):
        cosine_filter_triton(torch.randn(3, 4), torch.randn(3, 4), valid=torch.ones(3))
