"""Parameter and FLOP counts of a pack's components, measured on the meta device (no weights, no compute)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from synthgen.models.denoiser import Denoiser, build_denoiser_module
from synthgen.models.encoder import ImageEncoder, build_encoder_module
from synthgen.models.vae import LatentDecoder, build_vae_module
from synthgen.pack import PackConfig


@dataclass(frozen=True)
class ComponentCost:
    name: str
    network: str
    params: int
    flops: int  # per image, one forward (the denoiser: one step without guidance)
    what: str


def _count(fn) -> int:
    # The math SDPA backend has a FLOP formula everywhere; fused CPU kernels would count as zero.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def pack_costs(config: PackConfig) -> list[ComponentCost]:
    """Per-component parameter count and FLOPs per image (batch 1, meta tensors)."""
    meta = torch.device("meta")
    with meta:
        enc = ImageEncoder(config.encoder, build_encoder_module(config.encoder))
        den = Denoiser(config.denoiser.kind, build_denoiser_module(config.denoiser.kind, config.denoiser.config))
    size = config.encoder.crop
    costs = [
        ComponentCost(
            "encoder", config.encoder.model, _params(enc),
            _count(lambda: enc.embed(torch.empty(1, 3, size, size, device=meta))),
            f"{size}x{size} -> {config.encoder.dim}-d {config.encoder.embedding}",
        )
    ]
    x = torch.empty(1, *config.denoiser.sample_shape, device=meta)
    t = torch.empty(1, device=meta)
    c = torch.empty(1, config.denoiser.cond_dim, device=meta)
    costs.append(ComponentCost(
        "denoiser", type(den.net).__name__, _params(den), _count(lambda: den(x, t, c)),
        f"{tuple(config.denoiser.sample_shape)} per step, {config.schedule.prediction_type}",
    ))
    if config.vae is not None:
        with meta:
            vae = LatentDecoder(config.vae.kind, build_vae_module(config.vae.kind, config.vae.config), 1.0)
        costs.append(ComponentCost(
            "vae", type(vae.net).__name__, _params(vae), _count(lambda: vae(x)),
            f"decode {tuple(config.denoiser.sample_shape)} -> 3x{config.image_size}x{config.image_size}",
        ))
    return costs


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
