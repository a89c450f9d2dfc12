"""Image encoders: timm ViTs (DINOv2, DINOv3, CLIP vision towers) plus the preprocessing they expect.

The same `preprocess` serves real images in `embed` and generated images in the filter, so a
generated image is scored exactly the way its conditioning embedding was computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDINGS = ("cls", "pooled", "mean")
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
    embedding: str = "cls"  # "cls": normed CLS token; "pooled": timm's pre-logits pool; "mean": patch mean
    kwargs: dict = field(default_factory=dict)  # timm.create_model overrides (img_size, depth, ...)

    def __post_init__(self):
        if not any(tag in self.model for tag in FAMILIES.values()) or not self.model.startswith("vit_"):
            raise UsageError(
                f"encoder model {self.model!r} is not a supported timm ViT: use a DINOv2 "
                "('vit_*_patch14_dinov2*'), DINOv3 ('vit_*_patch16_dinov3*') or CLIP ('vit_*_clip_*') name"
            )
        if self.embedding not in EMBEDDINGS:
            raise UsageError(f"encoder embedding {self.embedding!r} is not one of {EMBEDDINGS}")
        if not 0 < self.crop <= self.resize:
            raise UsageError(f"encoder crop {self.crop} must be positive and <= resize {self.resize}")
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    def to_dict(self) -> dict:
        return asdict(self)


def build_encoder_module(spec: EncoderSpec) -> nn.Module:
    """The timm network, offline (pretrained=False); weights come from the pack's safetensors."""
    import timm

    kwargs = {"img_size": spec.crop, **spec.kwargs}
    return timm.create_model(spec.model, pretrained=False, num_classes=0, **kwargs)


class ImageEncoder(nn.Module):
    """(B, 3, H, W) float images in [0, 1] -> (B, dim) embeddings."""

    def __init__(self, spec: EncoderSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.net = net
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to `resize`, centre-crop `crop`, normalise. (B, 3, H, W) in [0, 1]."""
        return normalize(center_crop(resize_shorter(images, self.spec.resize), self.spec.crop), self.mean, self.std)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed (B, 3, crop, crop) -> (B, dim) float."""
        tokens = self.net.forward_features(pixels)  # (B, T, D), final norm applied
        if self.spec.embedding == "cls":
            return tokens[:, 0]
        if self.spec.embedding == "mean":
            return tokens[:, getattr(self.net, "num_prefix_tokens", 1):].mean(dim=1)
        return self.net.forward_head(tokens, pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images.to(self.mean.dtype)))


def resize_shorter(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> shorter side == size, aspect kept, antialiased bilinear."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    scale = size / min(h, w)
    out = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(images, size=out, mode="bilinear", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean) / std
