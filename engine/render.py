"""The device stages of one batch: condition -> sample -> decode -> score, with the non-finite retry.

  ids -> plan (anchors, mix, seeds) -> c (B, D) -> denoiser x K with guidance -> x0 -> VAE -> pixels
      -> cos(enc(pixels), c)

Each stage runs in bucketed chunks of its own size (scheduler.py); rows whose image or score is NaN/Inf
are rendered once more in a higher precision; the batch crosses to the host in one transfer. The filter's
decisions are taken later, per group of candidate ids (shard_job.py), never per batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from synthgen.condition import cond_uncond, conditions
from synthgen.kernels.dispatch import cosine_filter, guided_step
from synthgen.noise import STREAM_INIT, STREAM_STEP0, gaussian
from synthgen.plan import SamplePlan
from synthgen.runtime import Models, Runtime, retry_models
from synthgen.samplers import sample
from synthgen.scheduler import finite_rows, pad_rows, run_chunked


class Cancelled(Exception):
    """The shard no longer needs this batch: the device stage stops at the next denoiser step."""


@dataclass
class RenderedBatch:
    """Host-side outputs of one batch; arrays have length B."""

    plan: SamplePlan
    images: np.ndarray | None  # (B, H, W, 3) uint8; None when they stay on the device for nvJPEG
    scores: np.ndarray  # (B,) float32 cos(enc(x_hat), c); nan for non-finite rows
    valid: np.ndarray  # (B,) bool, False when the image or its score was NaN/Inf (after the retry)
    cond: np.ndarray  # (B, D) float32 conditioning used
    retried: np.ndarray  # (B,) bool, rows retried in higher precision (rescued when valid)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) float in [0, 1] when asked for (tests)
    device_images: torch.Tensor | None = None  # (B, H, W, 3) uint8 on the device, for nvJPEG


@torch.inference_mode()
def render_batch(rt: Runtime, sample_ids: np.ndarray, keep_pixels: bool = False,
                 cancel: threading.Event | None = None) -> RenderedBatch:
    """sample_ids (B,) int64 -> the batch's images, scores and bookkeeping; `cancel` stops it early."""
    plan = rt.planner.plan(sample_ids)
    seeds = torch.from_numpy(plan.seeds).to(rt.device)
    cond = conditions(rt.embeddings, plan, rt.cfg.lam, seeds)  # (B, D) float32
    pixels, valid, scores = _render(rt, rt.models, seeds, cond, cancel)
    retried = torch.zeros_like(valid)
    # The guard reads the valid mask on the host: one small sync per batch, right before the batch's
    # single transfer anyway; the retry itself only runs when a row is bad.
    bad = np.flatnonzero(~valid.cpu().numpy())
    if len(bad):
        rows = torch.from_numpy(bad).to(rt.device)
        p2, v2, s2 = _render(rt, retry_models(rt), seeds[rows], cond[rows], cancel)
        pixels = pixels.index_copy(0, rows, torch.where(v2.view(-1, 1, 1, 1), p2, pixels[rows]))
        scores = scores.index_copy(0, rows, torch.where(v2, s2, scores[rows]))
        valid, retried = valid.index_copy(0, rows, v2), retried.index_fill(0, rows, True)
    as_uint8 = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)
    on_device = rt.image_encoder == "nvjpeg"
    return RenderedBatch(
        plan=plan,
        images=None if on_device else as_uint8.cpu().numpy(),
        scores=scores.cpu().numpy(),
        valid=valid.cpu().numpy(),
        cond=cond.cpu().numpy(),
        retried=retried.cpu().numpy(),
        pixels=pixels.cpu() if keep_pixels else None,
        device_images=as_uint8.contiguous() if on_device else None,
    )


def _render(rt: Runtime, models: Models, seeds: torch.Tensor, cond: torch.Tensor, cancel):
    """seeds (n,) int64, cond (n, D) float32 -> pixels (n, 3, H, W) float32 in [0, 1], valid (n,) bool,
    scores (n,) float32 (nan where not valid). Everything stays on the device."""
    x0 = _denoise(rt, models, seeds, cond, cancel)
    images = _decode(rt, models, x0)
    valid = finite_rows(images)
    pixels = ((images.nan_to_num(0.0) + 1) / 2).clamp(0, 1).float()
    scores = _score(rt, models, pixels, cond)
    valid = valid & torch.isfinite(scores)
    return pixels, valid, torch.where(valid, scores, torch.full_like(scores, float("nan")))


def _chunked(rt: Runtime, stage: str, n: int, fn) -> torch.Tensor:
    """fn(start, stop, padded) over [0, n) in the stage's bucketed chunks, concatenated."""
    parts = run_chunked(fn, n, rt.batches[stage], rt.sizes.buckets)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _denoise(rt: Runtime, models: Models, seeds: torch.Tensor, cond: torch.Tensor, cancel) -> torch.Tensor:
    """-> x0 (n, *sample_shape) in models.state_dtype; padded rows repeat the last sample and are dropped."""

    def chunk(start: int, stop: int, padded: int) -> torch.Tensor:
        s, c = pad_rows(seeds[start:stop], padded), pad_rows(cond[start:stop], padded)
        return _sample(rt, models, s, c, cancel)[: stop - start]

    return _chunked(rt, "denoise", len(seeds), chunk)


def _sample(rt: Runtime, models: Models, seeds: torch.Tensor, cond: torch.Tensor, cancel) -> torch.Tensor:
    cond_in = cond.to(models.dtype)
    null_in = None if rt.null is None else rt.null.to(models.dtype)
    shape, state, guidance = rt.sample_shape, models.state_dtype, rt.cfg.guidance

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        out_cond, out_uncond = cond_uncond(models.denoiser, x.to(models.dtype), t, cond_in, null_in, guidance)
        return out_cond.to(state), None if out_uncond is None else out_uncond.to(state)

    def step(plan, k, x, outputs, prev_x0, noise):
        # Guidance and the sampler update as one elementwise pass (a Triton kernel on CUDA).
        return guided_step(plan, k, x, outputs[0], outputs[1], guidance, prev_x0, noise)

    def noise_fn(k: int) -> torch.Tensor:
        return gaussian(seeds, STREAM_STEP0 + k, shape, dtype=state)

    return sample(rt.sampler, model_fn, gaussian(seeds, STREAM_INIT, shape, dtype=state), noise_fn, step=step)


def _decode(rt: Runtime, models: Models, x0: torch.Tensor) -> torch.Tensor:
    """x0 (n, *sample_shape) -> images (n, 3, H, W) in [-1, 1] (NaN/Inf possible), in x0's dtype."""
    if models.vae is None:
        return x0

    def chunk(start: int, stop: int, padded: int) -> torch.Tensor:
        return models.vae(pad_rows(x0[start:stop], padded).to(models.dtype))[: stop - start].to(x0.dtype)

    return _chunked(rt, "decode", len(x0), chunk)


def _score(rt: Runtime, models: Models, pixels: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """pixels (n, 3, H, W) in [0, 1], cond (n, D) -> (n,) float32 cos(enc(x_hat), c), by the dispatcher's
    fused filter (the Triton kernel on CUDA)."""

    def chunk(start: int, stop: int, padded: int) -> torch.Tensor:
        emb = models.encoder(pad_rows(pixels[start:stop], padded).to(models.dtype))
        scores, _mask, _indices, _count = cosine_filter(emb, pad_rows(cond[start:stop], padded))
        return scores[: stop - start]

    return _chunked(rt, "filter", len(pixels), chunk)
