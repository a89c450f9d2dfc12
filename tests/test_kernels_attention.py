"""Fused attention kernel vs its float32 reference (and SDPA), under the Triton interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthgen.kernels.attention import attention_ref, attention_triton

# Kernel vs the float32 reference on the same (rounded) inputs: fp32 is accumulation-order noise; fp16/bf16
# allow the one rounding of p to the input dtype before p @ v and the rounding of the output.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, H, Tq, Tk, Dh): single token, ragged lengths vs 16-blocks, odd batch, cross lengths, head dims
# 8 (padded to 16), 24 (padded to 32), 32, 64, 128.
SHAPES = [
    (1, 1, 1, 1, 32),
    (1, 2, 40, 40, 32),
    (3, 1, 17, 33, 24),
    (2, 2, 48, 48, 64),
    (1, 1, 5, 70, 128),
    (1, 3, 37, 37, 8),
]


def _qkv(shape, dtype, seed):
    B, H, Tq, Tk, Dh = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, Dh, generator=g).to(dtype)
    k = torch.randn(B, H, Tk, Dh, generator=g).to(dtype)
    v = torch.randn(B, H, Tk, Dh, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype) -> None:
    q, k, v = _qkv(shape, dtype, seed=sum(shape))
    out = torch.full_like(q, float("nan"))  # poison: any element the kernel misses stays NaN
    got = attention_triton(q, k, v, out=out, block_m=16, block_n=16)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert torch.isfinite(got).all()
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), attention_ref(q, k, v).float(), atol=tol, rtol=tol)


def test_default_blocks_strided_inputs_and_output_layout() -> None:
    # The DiT's q, k, v are permuted views of one (B, T, 3, H, Dh) projection: no copies needed.
    B, T, H, Dh = 2, 45, 2, 32
    qkv = torch.randn(B, T, 3, H, Dh, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh), non-contiguous
    got = attention_triton(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # (B, H, T, Dh) view of (B, T, H, Dh) memory: the caller's transpose + reshape is free.
    assert got.transpose(1, 2).is_contiguous()


def test_explicit_scale() -> None:
    q, k, v = _qkv((1, 2, 19, 23, 32), torch.float32, seed=3)
    got = attention_triton(q, k, v, scale=0.3, block_m=16, block_n=16)
    torch.testing.assert_close(got, attention_ref(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_large_logits_stay_finite() -> None:
    # Scores around +-1000 overflow a naive exp; the running max keeps the online softmax finite.
    q, k, v = _qkv((1, 1, 20, 50, 16), torch.float32, seed=4)
    got = attention_triton(q * 30, k * 30, v, block_m=16, block_n=16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, attention_ref(q * 30, k * 30, v), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q, k.half(), v), "one dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "one dtype"),
        (lambda q, k, v: (q[..., :4].repeat(1, 1, 1, 75), k, v), "Dh"),
        (lambda q, k, v: (q[0], k[0], v[0]), "B, H"),
    ],
)
def test_shape_and_dtype_errors(mutate, match) -> None:
    q, k, v = _qkv((1, 1, 4, 4, 16), torch.float32, seed=5)
    with pytest.raises(ValueError, match=match):
        attention_triton(*mutate(q, k, v))
