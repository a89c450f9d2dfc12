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


NULL_CHOICES = ("pack", "zeros", "mean")  # generate --null: the pack's own, or one the user names


def null_kind(pack_null: str, choice: str = "pack") -> str:
    """The null condition a run uses: `choice` unless it defers to the pack ("pack")."""
    return pack_null if choice == "pack" else choice


def resolve_null(kind: str, learned: torch.Tensor | None, embeddings: torch.Tensor) -> torch.Tensor | None:
    """The (D,) float32 unconditional input for null `kind`, or None ("none": the pack has no null).

    learned: the pack's null vector ("learned"/"zeros" packs load one); embeddings: the bank (N, D).
    """
    if kind == "zeros":
        return torch.zeros(embeddings.shape[1], dtype=torch.float32, device=embeddings.device)
    if kind == "mean":
        return embeddings.float().mean(dim=0)
    if kind == "learned":
        return learned.float()
    return None


def cond_uncond(
    denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, cfg: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditional and unconditional predictions as ONE batched forward over both halves.

    x (B, C, H, W), t (B,), cond (B, D), null (D,) the pack's null condition -> two (B, C, H, W), or
    (out_cond, None) when cfg == 1 (plain conditional sampling needs no unconditional half).
    """
    if cfg == 1.0:
        return denoiser(x, t, cond), None
    both = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null.expand_as(cond)]))
    out_cond, out_uncond = both.chunk(2)
    return out_cond, out_uncond


def guided(
    denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, cfg: float
) -> torch.Tensor:
    """Classifier-free guidance on the representation: uncond + cfg * (cond - uncond), (B, C, H, W)."""
    out_cond, out_uncond = cond_uncond(denoiser, x, t, cond, null, cfg)
    return out_cond if out_uncond is None else out_uncond + cfg * (out_cond - out_uncond)
