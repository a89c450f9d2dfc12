"""The condition stage: what the denoiser sees for each planned sample, and what guidance contrasts it with.

  c = (1 - mix) * e[a] + mix * e[b] + lam * N(0, I)        (plan.py draws a, b, mix; noise.py the noise)

Guidance on the representation needs an unconditional input: the pack's learned null, zeros, or the
bank's mean embedding (`generate --null`); a pack imported without a learned null has none of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from synthgen.errors import UsageError
from synthgen.noise import STREAM_COND, gaussian
from synthgen.plan import SamplePlan


def conditions(embeddings: torch.Tensor, plan: SamplePlan, lam: float, seeds: torch.Tensor) -> torch.Tensor:
    """The conditioning vectors of a planned batch.

    embeddings (N, D) bank on the compute device, seeds (B,) int64 on the same device -> (B, D) float32.
    """
    device = embeddings.device
    a = embeddings[torch.from_numpy(plan.anchor_a).to(device)].float()
    b = embeddings[torch.from_numpy(plan.anchor_b).to(device)].float()
    mix = torch.from_numpy(plan.mix).to(device)[:, None]
    c = torch.lerp(a, b, mix)
    if lam > 0:
        c = c + lam * gaussian(seeds, STREAM_COND, (embeddings.shape[1],)).to(device)
    return c


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


def null_condition(pack, choice: str, embeddings: torch.Tensor) -> torch.Tensor | None:
    """The run's (D,) unconditional input: `choice` ("pack" | "zeros" | "mean") resolved against `pack`."""
    return resolve_null(null_kind(pack.config.denoiser.null_condition, choice), pack.null_condition, embeddings)


def check_guidance(guidance: float, pack_null: str, choice: str, pack_dir) -> None:
    """Guidance needs an unconditional input; a pack imported without a learned null has none to give."""
    if guidance != 1.0 and null_kind(pack_null, choice) == "none":
        raise UsageError(
            f"--cfg {guidance:g} needs an unconditional input, and pack {pack_dir} has no learned null condition "
            "(its denoiser was imported without one). Name one with --null zeros or --null mean (the bank's mean "
            "embedding), or generate without guidance (--cfg 1, the default)"
        )


def cond_uncond(
    denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, guidance: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditional and unconditional predictions as ONE batched forward over both halves.

    x (B, C, H, W), t (B,), cond (B, D), null (D,) -> two (B, C, H, W), or (out_cond, None) when
    guidance == 1 (plain conditional sampling needs no unconditional half).
    """
    if guidance == 1.0:
        return denoiser(x, t, cond), None
    both = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null.expand_as(cond)]))
    out_cond, out_uncond = both.chunk(2)
    return out_cond, out_uncond
