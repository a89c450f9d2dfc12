"""The dispatcher: which path runs where, export/compile safety, and the DiT wired through it."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from synthgen.kernels import adaln, attention
from synthgen.kernels import dispatch as kernels
from synthgen.kernels.filter import cosine_filter_ref
from synthgen.models.dit import DIT_PRESETS, DiT, reinit_zero_params_


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SYNTHGEN_KERNELS", raising=False)


@pytest.fixture
def kernels_must_not_run(monkeypatch):
    """Make every Triton launcher raise, so any call that reaches one fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel ran where the reference path was required")

    monkeypatch.setattr(attention, "attention_triton", boom)
    monkeypatch.setattr(adaln, "layernorm_modulate_triton", boom)
    monkeypatch.setattr(adaln, "gated_residual_triton", boom)


def test_choice_rules_on_cpu(no_env, monkeypatch) -> None:
    x = torch.randn(2, 3)
    assert kernels.HAS_TRITON
    assert not kernels.use_triton(x)  # CPU without an opt-in: reference
    with kernels.triton_kernels():
        assert kernels.use_triton(x)  # opted in under the interpreter (conftest sets it on CPU machines)
        with kernels.triton_kernels(False):
            assert not kernels.use_triton(x)
        assert not kernels.use_triton(torch.randn(2, requires_grad=True))  # forward-only kernels
        with torch.no_grad():
            assert kernels.use_triton(torch.randn(2, requires_grad=True))
        assert not kernels.use_triton(torch.empty(2, device="meta"))  # shape/FLOP counting
    monkeypatch.setenv("SYNTHGEN_KERNELS", "triton")
    assert kernels.use_triton(x)
    monkeypatch.setenv("SYNTHGEN_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("SYNTHGEN_KERNELS", "fast")
    with pytest.raises(ValueError, match="SYNTHGEN_KERNELS"):
        kernels.use_triton(x)


def test_cpu_default_is_the_reference(no_env, kernels_must_not_run) -> None:
    x, g = torch.randn(2, 5, 8), torch.randn(2, 8)
    assert torch.equal(kernels.gated_residual(x, g, x), x + g[:, None] * x)
    kernels.layernorm_modulate(x, g, g)
    q = torch.randn(1, 2, 5, 16)
    assert torch.equal(kernels.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_opted_in_ops_run_the_kernels(no_env) -> None:
    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    q = torch.randn(1, 2, 5, 16)
    emb, cond = torch.randn(4, 8), torch.randn(4, 8)
    with kernels.triton_kernels():
        torch.testing.assert_close(kernels.attention(q, q, q), attention.attention_ref(q, q, q), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernels.layernorm_modulate(x, g, g), adaln.layernorm_modulate_ref(x, g, g))
        torch.testing.assert_close(kernels.gated_residual(x, g, y), adaln.gated_residual_ref(x, g, y))
        scores, mask, indices, count = kernels.cosine_filter(emb, cond, 0.0)
    ref = cosine_filter_ref(emb, cond, 0.0)
    torch.testing.assert_close(scores, ref[0])
    assert torch.equal(indices, ref[2]) and int(count) == int(ref[3])


def test_unsupported_dtype_falls_back(no_env, kernels_must_not_run) -> None:
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with kernels.triton_kernels():
        assert kernels.attention(q, q, q).dtype == torch.float64


class _Block(nn.Module):
    """The three DiT ops in a row, small enough to export and compile in a second."""

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = mod.chunk(3, dim=1)  # 3 x (B, D)
        h = kernels.layernorm_modulate(x, shift, scale, 1e-6)  # (B, T, D)
        B, T, D = h.shape
        q = h.view(B, T, 2, D // 2).transpose(1, 2)  # (B, 2, T, D/2)
        y = kernels.attention(q, q, q).transpose(1, 2).reshape(B, T, D)
        return kernels.gated_residual(x, gate, y)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces its retirement
# The reference's int(x.shape[-1]) is deliberate (adaln.py): the feature width is a constant of the graph.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_onnx_export_uses_the_reference(no_env, kernels_must_not_run) -> None:
    x, mod = torch.randn(2, 6, 32), torch.randn(2, 96)
    with kernels.triton_kernels(), torch.no_grad():
        torch.onnx.export(_Block().eval(), (x, mod), io.BytesIO(), dynamo=False)


def test_compile_fullgraph_uses_the_reference(no_env) -> None:
    x, mod = torch.randn(2, 6, 32), torch.randn(2, 96)
    block = _Block()
    with kernels.triton_kernels():
        want = block(x, mod)  # interpreted kernels
        # Dynamo only (no inductor codegen): a graph break in the dispatcher would fail fullgraph=True.
        got = torch.compile(block, backend="eager", fullgraph=True)(x, mod)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _tiny_dit() -> DiT:
    torch.manual_seed(0)
    return reinit_zero_params_(DiT(DIT_PRESETS["tiny"]).eval(), generator=torch.Generator().manual_seed(1))


def test_dit_with_kernels_matches_without(no_env) -> None:
    model, cfg = _tiny_dit(), DIT_PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t, cond = torch.rand(2, generator=g) * 1000, torch.randn(2, cfg.cond_dim, generator=g)
    with torch.no_grad():
        want = model(x, t, cond)
        with kernels.triton_kernels():
            got = model(x, t, cond)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the CUDA path of the dispatcher")
def test_cuda_dit_bf16_with_and_without_kernels(no_env) -> None:
    model = _tiny_dit().cuda().to(torch.bfloat16)
    cfg = DIT_PRESETS["tiny"]
    x = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, device="cuda", dtype=torch.bfloat16)
    t, cond = torch.rand(4, device="cuda") * 1000, torch.randn(4, cfg.cond_dim, device="cuda", dtype=torch.bfloat16)
    assert kernels.use_triton(x)
    with torch.no_grad():
        got = model(x, t, cond)
        with kernels.triton_kernels(False):
            want = model(x, t, cond)
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
