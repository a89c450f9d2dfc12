"""Batched random augmentations on the device: one affine warp and one colour jitter per image.

torchvision's transforms draw one set of parameters per call; these draw one per image of a batch,
which is what contrastive learning and classifier augmentation need, without a Python loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor, generator: torch.Generator, degrees: float = 15.0, scale: tuple[float, float] = (0.8, 1.15),
    translate: float = 0.12, fill: float = 0.0,
) -> torch.Tensor:
    """(B, C, H, W) float -> same shape; per-image rotation, isotropic scale and translation."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator, device=x.device)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * translate * 2, (u[:, 3] * 2 - 1) * translate * 2  # grid units span 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def color_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.3, contrast: float = 0.3,
                 noise: float = 0.03) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> jittered, clamped to [0, 1]."""
    b = x.shape[0]
    u = torch.rand(b, 2, 1, 1, 1, generator=generator, device=x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + (u[:, 0] * 2 - 1) * contrast) + mean
    x = x * (1 + (u[:, 1] * 2 - 1) * brightness)
    x = x + noise * torch.randn(x.shape, generator=generator, device=x.device)
    return x.clamp(0, 1)


def ssl_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A strong view for contrastive learning: (B, 3, S, S) in [0, 1]."""
    x = random_affine(x, generator, degrees=20, scale=(0.7, 1.2), translate=0.15)
    return color_jitter(x, generator, brightness=0.4, contrast=0.4, noise=0.05)


def classifier_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The classical augmentation of the 'standard' recipe: mild affine + jitter."""
    x = random_affine(x, generator, degrees=10, scale=(0.9, 1.1), translate=0.08)
    return color_jitter(x, generator, brightness=0.2, contrast=0.2, noise=0.02)
