"""Fused LayerNorm + adaLN modulation and gated residual vs their references (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from synthgen.kernels.adaln import (
    gated_residual_ref,
    gated_residual_triton,
    layernorm_modulate_ref,
    layernorm_modulate_triton,
)

# Kernel (float32 math, one rounding at the store) vs the float32 reference on the same rounded inputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (B, T, D): one token, batch 1, odd sizes, a non-power-of-two width, a DiT-B width.
SHAPES = [(1, 1, 8), (1, 7, 64), (3, 17, 96), (2, 37, 33), (3, 5, 768)]


def _inputs(shape, dtype, seed):
    B, T, D = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, D, generator=g) * 3 + 1).to(dtype)  # off-centre, so the mean matters
    y = torch.randn(B, T, D, generator=g).to(dtype)
    # The modulation vectors are column chunks of one (B, 6D) projection, as in a DiT block (row stride 6D).
    shift, scale, gate = torch.randn(B, 6 * D, generator=g).to(dtype).chunk(6, dim=1)[:3]
    return x, y, shift, scale, gate


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate_matches_reference(shape, dtype) -> None:
    x, _, shift, scale, _ = _inputs(shape, dtype, seed=sum(shape))
    out = torch.full_like(x, float("nan"))  # poison
    got = layernorm_modulate_triton(x, shift, scale, 1e-6, out=out, block_rows=4)  # ragged row blocks
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    want = layernorm_modulate_ref(x.float(), shift.float(), scale.float(), 1e-6)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_matches_reference(shape, dtype) -> None:
    x, y, _, _, gate = _inputs(shape, dtype, seed=sum(shape) + 1)
    out = torch.full_like(x, float("nan"))
    got = gated_residual_triton(x, gate, y, out=out, block=128)  # ragged tail block
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    want = gated_residual_ref(x.float(), gate.float(), y.float())
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_default_policy_and_strided_x() -> None:
    x, y, shift, scale, gate = _inputs((2, 24, 40), torch.float32, seed=9)
    x_strided = torch.cat([x, x], dim=1)[:, ::2]  # (B, T, D) whose rows are not evenly spaced
    torch.testing.assert_close(
        layernorm_modulate_triton(x_strided, shift, scale), layernorm_modulate_ref(x_strided, shift, scale),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    torch.testing.assert_close(gated_residual_triton(x_strided, gate, y), gated_residual_ref(x_strided, gate, y))


def test_eps_is_used() -> None:
    x = torch.full((1, 3, 16), 2.0)  # constant rows: variance 0, so the output is shift exactly
    shift, scale = torch.randn(1, 16), torch.randn(1, 16)
    torch.testing.assert_close(layernorm_modulate_triton(x, shift, scale, 1e-6), shift[:, None].expand(1, 3, 16))


def test_errors_name_the_problem() -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        layernorm_modulate_triton(x, torch.randn(2, 9), torch.randn(2, 8))
    with pytest.raises(ValueError, match="y must match"):
        gated_residual_triton(x, torch.randn(2, 8), torch.randn(2, 3, 8).half())
