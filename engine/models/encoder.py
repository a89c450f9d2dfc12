"""Image encoders: timm ViTs (DINOv2, DINOv3, CLIP vision towers) plus the preprocessing they expect.

The same `preprocess` serves real images in `embed` and generated images in the filter, so a
generated image is scored exactly the way its conditioning embedding was computed.

Every self-attention block of the timm network runs its softmax(q k^T) v through
`synthgen.kernels.dispatch.attention` (the fused Triton kernel on CUDA, torch's SDPA elsewhere and while
exporting or compiling): `route_attention` swaps the block's class for a subclass whose forward is timm's
with that one call replaced, so parameters, buffers and state-dict keys are untouched and packs load as before.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.errors import UsageError
from synthgen.kernels import dispatch as kernels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# "cls": the CLS token after the final norm (DINOv2/DINOv3 pooler_output; CLIP's post-layernorm CLS);
# "cls_prenorm": the CLS token of the last block, before the final norm (CLIP's last_hidden_state[:, 0]);
# "projected": the network's head applied to the normed CLS (CLIP's visual projection, image_embeds);
# "pooled": timm's pre-logits pool; "mean": the mean of the patch tokens after the final norm.
EMBEDDINGS = ("cls", "cls_prenorm", "projected", "pooled", "mean")
RESIZE_MODES = ("shorter", "square")  # shorter side to `resize`, aspect kept | both sides to `resize`
INTERPOLATIONS = ("bilinear", "bicubic")  # antialiased, as PIL resizes
# The long side after a shorter-side resize: long * size / short rounded half up (DALI's rule, synthgen's first
# packs) or floored (torchvision's Resize(int) and transformers' image processors).
ROUNDINGS = ("half_up", "floor")
# Fields added after packs were first written: left out of to_dict at their defaults, so the canonical JSON
# (pack hashes, bank encoder ids) of every pack written before them is unchanged.
_LATER_FIELDS = {"resize_mode": "shorter", "interpolation": "bilinear", "rounding": "half_up", "normalize": False,
                 "recipe": ""}


@dataclass(frozen=True)
class ResizeRule:
    """The first preprocessing step: to (size, size) ("square"), or the shorter side to `size` ("shorter")."""

    size: int
    mode: str = "shorter"
    interpolation: str = "bilinear"
    rounding: str = "half_up"

    def output(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of an image of (height, width) after this resize (integer arithmetic, no float error)."""
        if self.mode == "square":
            return self.size, self.size
        short, size = min(height, width), self.size

        def scaled(n: int) -> int:
            if self.rounding == "floor":
                return n * size // short
            return (2 * n * size + short) // (2 * short)

        return scaled(height), scaled(width)
# timm name families the adapter knows how to read an embedding from.
FAMILIES = {"dinov2": "_dinov2", "dinov3": "_dinov3", "clip": "_clip_"}


@dataclass(frozen=True)
class EncoderSpec:
    model: str  # timm model name, e.g. "vit_base_patch14_dinov2"
    dim: int  # embedding dimension
    resize: int = 256  # shorter side before the centre crop
    crop: int = 224  # square input of the network
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embedding: str = "cls"  # which output is the embedding (EMBEDDINGS)
    kwargs: dict = field(default_factory=dict)  # timm.create_model overrides (img_size, depth, ...)
    resize_mode: str = "shorter"  # RESIZE_MODES
    interpolation: str = "bilinear"  # INTERPOLATIONS
    rounding: str = "half_up"  # ROUNDINGS
    normalize: bool = False  # L2-normalise the embedding
    recipe: str = ""  # the named recipe these preprocessing fields came from (synthgen.recipes), for the record

    def __post_init__(self):
        if not any(tag in self.model for tag in FAMILIES.values()) or not self.model.startswith("vit_"):
            raise UsageError(
                f"encoder model {self.model!r} is not a supported timm ViT: use a DINOv2 "
                "('vit_*_patch14_dinov2*'), DINOv3 ('vit_*_patch16_dinov3*') or CLIP ('vit_*_clip_*') name"
            )
        if self.embedding not in EMBEDDINGS:
            raise UsageError(f"encoder embedding {self.embedding!r} is not one of {EMBEDDINGS}")
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"encoder resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"encoder interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.rounding not in ROUNDINGS:
            raise UsageError(f"encoder rounding {self.rounding!r} is not one of {ROUNDINGS}")
        if not isinstance(self.normalize, bool):
            raise UsageError(f"encoder normalize {self.normalize!r} must be true or false")
        if not 0 < self.crop <= self.resize:
            raise UsageError(f"encoder crop {self.crop} must be positive and <= resize {self.resize}")
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    @property
    def resize_rule(self) -> ResizeRule:
        return ResizeRule(self.resize, self.resize_mode, self.interpolation, self.rounding)


def build_encoder_module(spec: EncoderSpec) -> nn.Module:
    """The timm network, offline (pretrained=False); weights come from the pack's safetensors.

    No classifier head unless the spec's kwargs ask for one (`num_classes`: a CLIP visual projection).
    """
    import timm

    kwargs = {"img_size": spec.crop, "num_classes": 0, **spec.kwargs}
    return route_attention(timm.create_model(spec.model, pretrained=False, **kwargs))


# ---- Attention through the kernel dispatcher ----


def route_attention(net: nn.Module) -> nn.Module:
    """Send every timm self-attention block of `net` through the kernel dispatcher, in place; returns `net`.

    Covered: `timm.layers.Attention` (the DINOv2 and CLIP ViT layouts, register tokens included) and
    `timm.models.eva.EvaAttention` (the DINOv3 layout: RoPE is applied to q and k before the attention,
    exactly as timm does, so it routes too). Only those exact classes are swapped; any other attention
    module (a subclass, AttentionRope, attention pooling) keeps timm's own forward.
    """
    routed = _routed_classes()
    for module in net.modules():
        cls = routed.get(type(module))
        if cls is not None:
            module.__class__ = cls  # same instance, parameters and buffers: only the forward changes
    return net


def _routable(module: nn.Module, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
    """The dispatcher computes plain unmasked, dropout-free attention; anything else stays on timm's path."""
    return attn_mask is None and not is_causal and not (module.training and module.attn_drop.p > 0)


def _attend_and_project(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        gate: torch.Tensor | None) -> torch.Tensor:
    """The shared tail of timm's attention forwards, with SDPA replaced by the dispatcher."""
    B, H, N, Dh = q.shape
    # Default scale Dh^-0.5: timm's fused path calls SDPA without a scale, so the fallback is that very call.
    y = kernels.attention(q, k, v)  # (B, H, N, Dh)
    y = y.transpose(1, 2).reshape(B, N, H * Dh)  # (B, N, H*Dh); free for the kernel's (B, N, H, Dh) output
    norm = getattr(module, "norm", None)  # scale_norm: Identity in these layouts
    if norm is not None:
        y = norm(y)
    if gate is not None:
        y = y * gate
    return module.proj_drop(module.proj(y))  # (B, N, D)


def _vit_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                           is_causal: bool = False) -> torch.Tensor:
    """timm.layers.Attention.forward (timm 1.0) with the attention step routed."""
    if not _routable(self, attn_mask, is_causal):
        return self._timm_forward(x, attn_mask=attn_mask, is_causal=is_causal)
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # 3 x (B, H, N, Dh), strided views of one projection
    return _attend_and_project(self, self.q_norm(q), self.k_norm(k), v, gate)


def _eva_attention_forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm.models.eva.EvaAttention.forward (timm 1.0) with the attention step routed."""
    if not _routable(self, attn_mask, is_causal):
        return self._timm_forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    if self.qkv is not None:
        if self.q_bias is None:
            qkv = self.qkv(x)
        elif getattr(self, "qkv_bias_separate", False):  # no k bias: timm keeps a zero buffer in its place
            qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, Dh)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:  # rotate the patch tokens only; CLS and register tokens carry no position
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], self._rotate(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], self._rotate(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    return _attend_and_project(self, q, k, v, gate)


@functools.cache
def _routed_classes() -> dict[type, type]:
    """{timm attention class: routed subclass}, built on first use so importing this module skips timm."""
    from timm.layers import Attention, apply_rot_embed_cat
    from timm.models.eva import EvaAttention

    classes = {}
    for base, forward, extra in (
        (Attention, _vit_attention_forward, {}),
        (EvaAttention, _eva_attention_forward, {"_rotate": staticmethod(apply_rot_embed_cat)}),
    ):
        name = f"Routed{base.__name__}"
        namespace = {"forward": forward, "_timm_forward": base.forward, "__module__": __name__, "__qualname__": name,
                     "__doc__": f"{base.__name__} whose attention step runs through synthgen.kernels.dispatch."}
        cls = type(name, (base,), {**namespace, **extra})
        classes[base] = cls
    return classes


def __getattr__(name: str) -> type:
    """`RoutedAttention` / `RoutedEvaAttention` as module attributes (PEP 562), so routed networks pickle."""
    if name.startswith("Routed"):
        for cls in _routed_classes().values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ImageEncoder(nn.Module):
    """(B, 3, H, W) float images in [0, 1] -> (B, dim) embeddings."""

    def __init__(self, spec: EncoderSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.net = net
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (the spec's mode and interpolation), centre-crop `crop`, normalise. (B, 3, H, W) in [0, 1]."""
        resized = resize(images, self.spec.resize_rule)
        return normalize(center_crop(resized, self.spec.crop), self.mean, self.std)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed (B, 3, crop, crop) -> (B, dim) float."""
        out = self._read_embedding(pixels)
        return F.normalize(out, dim=-1) if self.spec.normalize else out

    def _read_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        kind = self.spec.embedding
        if kind == "cls_prenorm":
            # The last block's output without the final norm; prefix tokens are (CLS, registers...).
            (_, prefix), = self.net.forward_intermediates(
                pixels, indices=1, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
            return prefix[:, 0]
        tokens = self.net.forward_features(pixels)  # (B, T, D), final norm applied
        if kind == "cls":
            return tokens[:, 0]
        if kind == "mean":
            return tokens[:, getattr(self.net, "num_prefix_tokens", 1):].mean(dim=1)
        return self.net.forward_head(tokens, pre_logits=kind == "pooled")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images.to(self.mean.dtype)))


def resize(images: torch.Tensor, rule: ResizeRule | int) -> torch.Tensor:
    """(B, C, H, W) -> the size `rule` gives, antialiased as PIL and torchvision resize PIL images.

    A no-op when the images already have that size (checked first: under tracing H and W are tensors, and a
    traced encoder never resizes).
    """
    rule = rule if isinstance(rule, ResizeRule) else ResizeRule(rule)
    h, w = images.shape[-2:]
    size = rule.size
    if (h == size and w == size) if rule.mode == "square" else min(h, w) == size:
        return images
    out = rule.output(int(h), int(w))
    if images.dtype in (torch.float16, torch.bfloat16):
        # The antialiased kernels have no half-precision CPU implementation; resizing in float32 costs
        # little beside the network and keeps a bf16 run's preprocessing equal to an fp32 run's.
        return F.interpolate(images.float(), size=out, mode=rule.interpolation, antialias=True,
                             align_corners=False).to(images.dtype)
    return F.interpolate(images, size=out, mode=rule.interpolation, antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean) / std
