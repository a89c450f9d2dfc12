"""Latent decoders: diffusers `AutoencoderKL` (SD-VAE layout) and `AutoencoderTiny` (TAESD layout)."""

from __future__ import annotations

import torch
from torch import nn

from synthgen.errors import UsageError

VAE_KINDS = ("autoencoder_kl", "autoencoder_tiny")


def build_vae_module(kind: str, config: dict) -> nn.Module:
    if kind == "autoencoder_kl":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**config)
    if kind == "autoencoder_tiny":
        from diffusers import AutoencoderTiny

        return AutoencoderTiny(**config)
    raise UsageError(f"vae kind {kind!r} is not one of {VAE_KINDS}")


def vae_downsample_factor(kind: str, config: dict) -> int:
    """Pixels per latent along one side, from the diffusers config (as the diffusers classes compute it)."""
    if kind == "autoencoder_kl":
        return 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    # AutoencoderTiny: every encoder block after the first halves the resolution.
    return 2 ** (len(config.get("encoder_block_out_channels", (64, 64, 64, 64))) - 1)


class LatentDecoder(nn.Module):
    """(B, c, h, w) latents in the denoiser's scaled space -> (B, 3, H, W) images in [-1, 1]."""

    def __init__(self, kind: str, net: nn.Module, scaling_factor: float):
        super().__init__()
        self.kind = kind
        self.net = net
        self.scaling_factor = scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net.decode(latents / self.scaling_factor, return_dict=False)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (the distribution's mean for AutoencoderKL)."""
        if self.kind == "autoencoder_kl":
            return self.net.encode(images).latent_dist.mode() * self.scaling_factor
        return self.net.encode(images, return_dict=False)[0] * self.scaling_factor
