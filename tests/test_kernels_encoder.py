"""The timm ViT encoders with their attention routed through the kernel dispatcher: same numbers as timm.

Tiny random layouts of every family the adapter supports (DINOv2 with and without register tokens, CLIP,
DINOv3 with RoPE and register tokens), weights re-drawn so no block is a near-identity (timm's layer
scale starts at 1e-5). The kernel runs under the Triton interpreter here; the CUDA test runs on a GPU.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch

from synthgen.export.onnx_export import export_onnx
from synthgen.kernels import attention
from synthgen.kernels import dispatch as kernels
from synthgen.models.encoder import EncoderSpec, ImageEncoder, build_encoder_module

# name -> (timm model, create_model overrides). Head dims 32 and 24 (padded to 32 in the kernel); token
# counts 5, 9 (CLS + 4 registers + 4 patches) and 17: all ragged against the kernel's blocks.
LAYOUTS = {
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, embed_dim=64, depth=2, num_heads=2)),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=64, depth=2, num_heads=2)),
    "clip": ("vit_base_patch32_clip_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=32, embed_dim=64, depth=2, num_heads=2)),
    "dinov3-qkv-bias": ("vit_small_patch16_dinov3",
                        dict(img_size=32, embed_dim=64, depth=2, num_heads=2, qkv_bias=True)),
}


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("SYNTHGEN_KERNELS", raising=False)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the attention kernel (the dispatcher looks the launcher up at call time)."""
    calls = []
    launch = attention.attention_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(attention, "attention_triton", counted)
    return calls


def _pair(layout: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(routed network from build_encoder_module, timm's own network) holding the same random weights."""
    model, kwargs = LAYOUTS[layout]
    spec = EncoderSpec(model=model, dim=kwargs["embed_dim"], resize=kwargs["img_size"], crop=kwargs["img_size"],
                       kwargs={k: v for k, v in kwargs.items() if k != "img_size"})
    routed = build_encoder_module(spec).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    plain = timm.create_model(model, pretrained=False, num_classes=0, **kwargs).eval()
    plain.load_state_dict(routed.state_dict(), strict=True)  # same keys, nothing missing or extra
    return routed, plain


def _images(net: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = net.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_attention_block_is_routed_and_keys_unchanged(layout) -> None:
    routed, plain = _pair(layout)
    names = [type(m).__name__ for m in routed.modules() if type(m).__name__.startswith("Routed")]
    assert len(names) == len(routed.blocks) and set(names) <= {"RoutedAttention", "RoutedEvaAttention"}
    assert list(routed.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in routed.named_buffers()] == [n for n, _ in plain.named_buffers()]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_path_matches_timm(layout, kernel_calls) -> None:
    routed, plain = _pair(layout)
    x = _images(routed)
    with torch.no_grad():
        got, want = routed.forward_features(x), plain.forward_features(x)
    assert not kernel_calls  # CPU without an opt-in: SDPA, the very call timm makes
    assert want.abs().max() > 1.0  # the attention blocks matter: not a near-identity network
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernel_path_matches_timm(layout, kernel_calls) -> None:
    routed, plain = _pair(layout)
    x = _images(routed, batch=3)
    with torch.no_grad():
        want = plain.forward_features(x)
        with kernels.triton_kernels():
            got = routed.forward_features(x)
    assert len(kernel_calls) == len(routed.blocks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_env_var_forces_the_kernel_through_image_encoder(monkeypatch, kernel_calls) -> None:
    routed, plain = _pair("dinov3")
    spec = EncoderSpec(model="vit_small_patch16_dinov3", dim=64, resize=32, crop=32, embedding="mean")
    images = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ImageEncoder(spec, plain)(images)
        monkeypatch.setenv("SYNTHGEN_KERNELS", "triton")
        got = ImageEncoder(spec, routed)(images)
    assert len(kernel_calls) == len(routed.blocks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_masks_dropout_and_autograd_keep_timms_path(kernel_calls) -> None:
    routed, plain = _pair("dinov2")
    attn, ref = routed.blocks[0].attn, plain.blocks[0].attn
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.eye(5, dtype=torch.bool) | (torch.rand(5, 5, generator=torch.Generator().manual_seed(4)) > 0.5)
    with kernels.triton_kernels(), torch.no_grad():
        torch.testing.assert_close(attn(x, attn_mask=mask), ref(x, attn_mask=mask))  # masked: timm's forward
        torch.testing.assert_close(attn(x, is_causal=True), ref(x, is_causal=True))
        attn.attn_drop.p = ref.attn_drop.p = 0.5
        attn.train()
        assert not torch.equal(attn(x), attn(x))  # dropout on the weights: timm's forward, still random
    assert not kernel_calls
    # Training (the SimCLR encoder): grads flow through the reference, the kernels are forward-only.
    routed.train()
    routed.blocks[0].attn.attn_drop.p = 0.0
    with kernels.triton_kernels():
        routed.forward_features(_images(routed)).square().mean().backward()
    assert not kernel_calls and routed.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("layout", ["dinov2-reg", "dinov3"])
def test_compile_fullgraph_uses_the_reference(layout, kernel_calls) -> None:
    routed, plain = _pair(layout)
    x = _images(routed)
    with kernels.triton_kernels(), torch.no_grad():
        # Dynamo only (no inductor codegen): a graph break in the routed forward would fail fullgraph=True.
        got = torch.compile(routed.forward_features, backend="eager", fullgraph=True)(x)
        want = plain.forward_features(x)
    assert not kernel_calls
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# torchscript is the exporter `auto` picks; dynamo (slow, ~10 s) once, on the RoPE layout.
@pytest.mark.parametrize("layout, exporter", [("dinov2-reg", "torchscript"), ("clip", "torchscript"),
                                              ("dinov3", "torchscript"), ("dinov3", "dynamo")])
def test_onnx_export_uses_the_reference_and_matches(layout, exporter, kernel_calls, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    routed, plain = _pair(layout)
    size = routed.patch_embed.img_size[0]
    spec = EncoderSpec(model=LAYOUTS[layout][0], dim=routed.embed_dim, resize=size, crop=size, embedding="mean")
    encoder = ImageEncoder(spec, routed).eval()
    with kernels.triton_kernels():  # forced on: export must still trace the reference
        path = export_onnx(encoder, (torch.rand(2, 3, size, size),), tmp_path / "encoder.onnx", ["images"],
                           ["embedding"], exporter=exporter)
    assert not kernel_calls
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(5))  # another batch size
    with torch.no_grad():
        want = ImageEncoder(spec, plain).eval()(images)
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_routed_network_copies_and_pickles() -> None:
    routed, _ = _pair("dinov3")
    x = _images(routed)
    with torch.no_grad():
        want = routed.forward_features(x)
        for clone in (copy.deepcopy(routed), pickle.loads(pickle.dumps(routed))):
            assert type(clone.blocks[0].attn) is type(routed.blocks[0].attn)
            assert torch.equal(clone.forward_features(x), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the CUDA path of the dispatcher")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["dinov2-reg", "clip", "dinov3"])
def test_cuda_kernel_matches_timm(layout, dtype, kernel_calls) -> None:
    routed, plain = _pair(layout)
    routed, plain = routed.cuda().to(dtype), plain.cuda().to(dtype)
    x = _images(routed, batch=4).cuda().to(dtype)
    with torch.no_grad():
        got, want = routed.forward_features(x), plain.forward_features(x)
    assert len(kernel_calls) == len(routed.blocks)
    # Relative to the output's scale: in bf16 the two paths round p and the outputs at different points.
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < (1e-4 if dtype == torch.float32 else 3e-2), err
