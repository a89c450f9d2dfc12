"""The runtime: everything a process loads once to generate shards -- the pack's networks (eager, or the
backends of an engine folder standing in for them), the bank on the device, the planner, the sampler plan
and the per-stage batch sizes. The pack stays a value: backends live here, beside it, never inside it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from synthgen.bank import Bank, check_bank_fits_pack, load_bank
from synthgen.condition import null_condition
from synthgen.config import GenerateConfig
from synthgen.encode import resolve_image_encoder
from synthgen.errors import UsageError
from synthgen.export.backends import TORCH_DTYPES
from synthgen.pack import Pack, load_pack
from synthgen.plan import Planner
from synthgen.samplers import SamplerPlan, make_plan
from synthgen.scheduler import STAGES, AdaptiveBatch, BatchSizes, retry_dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What out-of-memory sizes are remembered per: the GPU model, or the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def resolve_bank_path(cfg: GenerateConfig) -> Path:
    if cfg.bank is not None:
        return cfg.bank
    if (cfg.pack / "bank" / "bank.json").is_file():
        return cfg.pack / "bank"
    raise UsageError(
        f"no --bank given and pack {cfg.pack} ships no bank/ folder; build one with "
        f"'synthgen embed --images DIR --pack {cfg.pack} --out BANK' and pass --bank BANK"
    )


@dataclass
class Models:
    """The networks of one precision: the run's own, or the higher one non-finite rows are retried in."""

    denoiser: Callable
    vae: Callable | None
    encoder: Callable
    dtype: torch.dtype

    @property
    def state_dtype(self) -> torch.dtype:
        # The sampler state stays float32 (float64 in a float64 retry); only the networks run in `dtype`.
        return torch.float64 if self.dtype == torch.float64 else torch.float32


@dataclass
class Runtime:
    cfg: GenerateConfig
    pack: Pack
    bank: Bank
    planner: Planner
    sampler: SamplerPlan
    device: torch.device
    models: Models  # the run's networks: backends where an engine folder provides them, else the pack's
    embeddings: torch.Tensor  # (N, D) bank on the device
    null: torch.Tensor | None  # (D,) on the device; None without guidance on a pack that has no null
    sizes: BatchSizes
    image_encoder: str  # "nvjpeg" | "simplejpeg" | "pillow"
    batches: dict[str, AdaptiveBatch]  # working chunk size per stage, shrunk by out-of-memory errors
    retry: Models | None = None  # built on the first non-finite row
    restored: bool = False  # working sizes taken over from earlier processes on the run folder (once)

    @property
    def dtype(self) -> torch.dtype:
        return self.models.dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.pack.config.denoiser.sample_shape

    @property
    def oom_backoffs(self) -> int:
        return sum(b.backoffs for b in self.batches.values())


def load_runtime(cfg: GenerateConfig) -> Runtime:
    device = resolve_device(cfg.device)
    dtype = TORCH_DTYPES[cfg.dtype]
    bank = load_bank(resolve_bank_path(cfg))
    pack = load_pack(cfg.pack, device=device, dtype=dtype)
    sizes = cfg.batch_sizes
    backends = {}
    if cfg.engine is not None or cfg.backend != "eager":
        from synthgen.engines import engine_components  # onnxruntime / TensorRT only when asked for

        backends = engine_components(pack, device, sizes, cfg.engine, cfg.backend, cfg.dtype, cfg.guidance)
    check_bank_fits_pack(bank, pack.config, cfg.pack)
    models = Models(*(backends.get(c, getattr(pack, c)) for c in ("denoiser", "vae", "encoder")), dtype)
    embeddings = bank.embeddings.to(device)
    return Runtime(
        cfg, pack, bank, Planner(bank.labels, bank.class_names, cfg.plan_config),
        make_plan(cfg.sampler, pack.config.schedule, cfg.steps, device=device), device, models, embeddings,
        null_condition(pack, cfg.null, embeddings), sizes,
        resolve_image_encoder(cfg.image_encoder, cfg.format, device),
        {stage: AdaptiveBatch(stage, sizes.of(stage)) for stage in STAGES},
    )


def retry_models(rt: Runtime) -> Models:
    """Copies of the pack's eager networks in the retry precision (scheduler.retry_dtype), made on first
    use: a non-finite row is rare, and the copies cost memory."""
    if rt.retry is None:
        dtype = retry_dtype(rt.dtype)
        with torch.inference_mode(False):  # plain parameters, not inference tensors
            denoiser, vae, encoder = (_copy_in(m, dtype) for m in (rt.pack.denoiser, rt.pack.vae, rt.pack.encoder))
        rt.retry = Models(denoiser, vae, encoder, dtype)
    return rt.retry


def _copy_in(module, dtype: torch.dtype):
    if module is None:
        return None
    return copy.deepcopy(module).to(dtype).eval().requires_grad_(False)
