"""Conditioned denoisers behind one call signature: (x, t, cond) -> prediction.

Two families: the published recipe, a diffusers `UNet2DConditionModel` that sees the representation as
ONE cross-attention token, and our compact DiT (`synthgen.models.dit`) with adaLN conditioning.
Weights are stored with the wrapped network's own key names, so a public diffusers UNet checkpoint
in safetensors loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from synthgen.errors import UsageError

DENOISER_KINDS = ("unet2d", "dit")


def build_denoiser_module(kind: str, config: dict) -> nn.Module:
    """The bare network (the module whose state dict the pack stores)."""
    if kind == "unet2d":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)
    if kind == "dit":
        from synthgen.models.dit import DiT, DiTConfig

        return DiT(DiTConfig.from_dict(config))
    raise UsageError(f"denoiser kind {kind!r} is not one of {DENOISER_KINDS}")


class Denoiser(nn.Module):
    """x (B, C, H, W), t (B,) float timesteps, cond (B, D) -> (B, C, H, W) model output."""

    def __init__(self, kind: str, net: nn.Module):
        super().__init__()
        self.kind = kind
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.kind == "unet2d":
            # The representation is a single cross-attention token: (B, 1, D).
            return self.net(x, t, encoder_hidden_states=cond[:, None, :], return_dict=False)[0]
        return self.net(x, t, cond)
