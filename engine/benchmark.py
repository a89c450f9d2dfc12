"""`synthgen bench`: per-stage throughput, end-to-end images/s, FLOPs and a naive baseline, in one run.

Every stage is timed alone on the same loaded pack, warm-up calls excluded, as the median of `repeats`:

  decode        real image files -> (H, W, 3) uint8 as `embed` reads them: the sources readers and a
                `synthgen.decode` decoder (PIL, and DALI when importable) resizing to the encoder's
                input; one pass over the whole source
  encode        decoded real images -> embeddings with the pack encoder, exactly as `synthgen embed` does
                (per-image preprocess, then one batched `embed`)
  denoise_step  ONE denoiser forward over a batch, cond and uncond halves batched into one call as
                generate does it (`cond_uncond`); images/s counts images, not network rows
  vae_decode    latents -> pixels (only for packs with a VAE)
  filter        generated pixels -> encoder -> cosine score against the condition (generate's filter)
  image_encode  (H, W, 3) uint8 -> JPEG/WebP/PNG bytes with `shards.encode_image`, one thread, for each
                host encoder here (simplejpeg, which generate picks when installed, and Pillow)
  write         encoded samples -> one tar shard with `ShardWriter`, commit (fsync + rename) included

End to end calls the real `run_generate` into a temporary folder with the same settings; its images/s
is the run summary's (model loading excluded). The naive baseline drives the same pack the way a
diffusers pipeline would: a small batch per call, a diffusers scheduler loop calling the denoiser once
per step on the uncond and cond rows stacked (as diffusers batches CFG), then VAE decode, re-encode for
the score, PIL encode and tar write, all in sequence. Both produce the same work per image, so their
ratio is the speed-up of the engine. The naive loop runs eager PyTorch in the run dtype unless
`--naive-dtype` names another one (fp32: a diffusers pipeline's default), so the ratio either isolates
what scheduling and engines buy (same dtype) or also counts the precision choice. Beside each ratio the
bench prints its ceiling on this machine: the denoiser's share of an image's FLOPs for end to end vs
denoise-only, and synthgen at the matmul peak over the naive loop's FLOP rate for synthgen vs naive.

FLOPs per image come from `synthgen.flops` (counted on the meta device); the share of peak divides the
achieved FLOP/s by a square matmul measured in the same process, in fp32 and in the run dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from synthgen.config import BenchConfig, GenerateConfig, resolve_pack
from synthgen.errors import UsageError
from synthgen.export.backends import TORCH_DTYPES
from synthgen.export.timing import timed
from synthgen.samplers import NoiseSchedule

GEN = GenerateConfig.__dataclass_fields__
PHOTOS = ("china.jpg", "flower.jpg")  # real photos that ship inside scikit-learn's wheel (427 x 640)
EMBED_BATCH = 64  # images per decoder / encoder call in `synthgen embed` (its --batch default)
STAGES = ("decode", "encode", "denoise_step", "vae_decode", "filter", "image_encode", "write")


# ---- Configuration -----------------------------------------------------------------------------------


# ---- Results -----------------------------------------------------------------------------------------


@dataclass
class StageResult:
    stage: str
    batch: int | None  # None: the stage works image by image (decode, image encode, write)
    images: int  # images per timed call
    seconds: float  # median over the repeats
    times: list[float]  # every timed repeat, seconds
    images_per_s: float
    gflop_per_img: float | None = None
    share_of_peak: float | None = None  # achieved FLOP/s / measured matmul peak in the run dtype
    note: str = ""


@dataclass
class EndToEnd:
    steps: int
    batch: int  # denoiser rows per chunk (x2 network rows under CFG)
    decode_batch: int
    filter_batch: int
    n: int
    images_per_s: float  # synthgen run_generate, model load excluded
    seconds: float
    wall_seconds: float  # run_generate including model load and run-folder bookkeeping
    denoise_only_images_per_s: float  # denoise_step images/s at this batch / steps
    fraction_of_denoise_only: float
    # The denoiser's share of an image's FLOPs: what fraction_of_denoise_only would be if the VAE and the
    # filter, which run on the same device, ran at the denoiser's FLOP rate. Overlap cannot beat it.
    denoise_flop_share: float
    naive_images_per_s: float
    naive_batch: int
    naive_dtype: str  # the naive loop runs eager PyTorch in this dtype
    ratio_vs_naive: float  # synthgen / naive
    naive_share_of_peak: float  # the naive loop's FLOP/s / the matmul peak in its own dtype
    ratio_bound: float  # synthgen at 100 % of the matmul peak in the run dtype / naive: no engine beats it
    gflop_per_img: float
    share_of_peak: float


@dataclass
class BenchResult:
    config: dict
    environment: dict
    pack: dict  # name, source, random weights, image size, components' GFLOP/img
    peak_gflops: dict  # dtype -> measured matmul GFLOP/s
    stages: list[StageResult] = field(default_factory=list)
    end_to_end: list[EndToEnd] = field(default_factory=list)
    build_seconds: dict = field(default_factory=dict)  # engine build time per batch (non-eager backends)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- Timing ------------------------------------------------------------------------------------------


def stage_result(stage: str, batch: int | None, images: int, times: list[float], flops: float | None = None,
                 peak: float | None = None, note: str = "") -> StageResult:
    seconds = statistics.median(times)
    ips = images / seconds
    share = flops * ips / peak if flops and peak else None
    return StageResult(stage, batch, images, seconds, times, ips, flops / 1e9 if flops else None, share, note)


def matmul_peak(dtype: torch.dtype, size: int, device: torch.device, repeats: int = 5) -> float:
    """Measured FLOP/s of a (size x size) @ (size x size) matmul in `dtype`.

    The fastest of `repeats`, not the median: a peak is what the machine can do, and on a shared machine
    the slower repeats measure the neighbours.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = timed(lambda: a @ b, device, warmup=1, repeats=repeats)
    return 2 * size**3 / min(times)


# ---- Inputs --------------------------------------------------------------------------------------------


def write_photo_folder(out: Path, count: int = 64, size: int = 256, quality: int = 90) -> str:
    """An image-folder source of `count` real JPEG crops (size x size) of the photos in scikit-learn's
    wheel, one class per photo. Real camera content keeps JPEG decode cost honest (noise would not)."""
    import sklearn
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    for k in range(count):
        name = PHOTOS[k % len(PHOTOS)]
        with Image.open(folder / name) as photo:
            w, h = photo.size
            left, top = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
            crop = photo.convert("RGB").crop((left, top, left + size, top + size))
        (out / name.split(".")[0]).mkdir(parents=True, exist_ok=True)
        crop.save(out / name.split(".")[0] / f"{k:04d}.jpg", quality=quality)
    return str(out)


def prepare_pack(cfg: BenchConfig, work: Path) -> tuple[Path, str]:
    """(pack folder, how it was chosen)."""
    if cfg.preset is not None:
        from synthgen.presets import write_random_pack

        write_random_pack(cfg.preset, work / "pack", seed=0)
        return work / "pack", f"preset {cfg.preset}"
    path = resolve_pack(cfg.pack)
    return path, "default pack" if cfg.pack is None else str(path)


def prepare_bank(pack_dir: Path, images: str, work: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """The pack's own bank when it ships one, else `images` embedded into a temporary bank."""
    from synthgen.bank import build_bank

    if (pack_dir / "bank" / "bank.json").is_file():
        return pack_dir / "bank"
    build_bank(images, pack_dir, work / "bank", 64, str(device), dtype, progress=False)
    return work / "bank"


def cycled(items, count: int) -> list:
    """The first `count` items of items repeated: a batch of any size from a short list."""
    return [items[i % len(items)] for i in range(count)]


@contextlib.contextmanager
def engine_cache(path: Path):
    """Engines built by the bench go to a temporary cache, never into the pack folder (which may be the
    default pack inside the installed package)."""
    old = os.environ.get("SYNTHGEN_ENGINE_CACHE")
    os.environ["SYNTHGEN_ENGINE_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SYNTHGEN_ENGINE_CACHE", None)
        else:
            os.environ["SYNTHGEN_ENGINE_CACHE"] = old


# ---- Stage: decode ---------------------------------------------------------------------------------------


def decoders(resize: int, batch: int, device: torch.device) -> dict[str, object]:
    """name -> decoder as `embed` builds it (shorter side to the encoder's resize, `batch` per call).

    Both PIL and, when importable, DALI (`synthgen.decode`). {"pil": None} where the sources readers
    take no decoder (they decode with PIL by themselves, at the images' own size).
    """
    from synthgen.sources import ImageSource

    if not hasattr(ImageSource, "items"):  # sources that decode by themselves (no pluggable decoder)
        return {"pil": None}
    from synthgen.decode import dali_available, make_decoder

    out = {"pil": make_decoder("pil", resize=resize, batch_size=batch, device=str(device))}
    if dali_available():
        out["dali"] = make_decoder("dali", resize=resize, batch_size=batch, device=str(device))
    return out


def decode_all(spec: str, decoder) -> list[np.ndarray]:
    """Read and decode every image of the source `spec` as `embed` iterates it; readable images only."""
    from synthgen.sources import open_source

    source = open_source(spec)
    items = source if decoder is None else source.items(decoder)
    return [item.image for item in items if item.image is not None]


def time_decode(spec: str, cfg: BenchConfig, device: torch.device, resize: int,
                notes: list[str]) -> tuple[list[StageResult], list[np.ndarray]]:
    """One pass over the whole source per repeat and decoder; returns the results and the PIL images.

    A decoder other than PIL that fails is reported in `notes` and left out, never fatal.
    """
    found = decoders(resize, EMBED_BATCH, device)
    images = decode_all(spec, found["pil"])
    if not images:
        raise UsageError(f"--images {spec!r} holds no readable image to benchmark decode and encode with")
    if found["pil"] is None:
        notes.append("decode: these sources readers take no decoder (no DALI path); timed their own PIL decoding")
    elif "dali" not in found:
        notes.append("decode: NVIDIA DALI is not importable here; timed the PIL decoder only")
    results = []
    for name, decoder in found.items():
        try:
            count = len(decode_all(spec, decoder))
        except Exception as exc:  # noqa: BLE001 - an optional decoder's failure is data for the report
            notes.append(f"decoder {name} failed and was not timed: {type(exc).__name__}: {exc}")
            continue
        times = timed(lambda: decode_all(spec, decoder), device, cfg.warmup, cfg.repeats)
        what = "pil (sources readers)" if decoder is None else (decoder.description if name == "dali" else name)
        what += f", resize {resize}" if decoder is not None else ""
        results.append(stage_result("decode", None, count, times, note=f"{what}, {count} files"))
    return results, images


# ---- Stages on one batch ----------------------------------------------------------------------------------


@dataclass
class StageInputs:
    """What the model stages consume, prepared once (host side)."""

    real: list[np.ndarray]  # decoded real images (H, W, 3) uint8
    generated: np.ndarray  # (G, H, W, 3) uint8 images the pack generated (naive sampler, fewest steps)
    conditions: torch.Tensor  # (N, D) float32 bank embeddings
    labels: np.ndarray  # (N,) int64


def denoise_call(pack, inputs: StageInputs, cfg: BenchConfig, batch: int, device: torch.device) -> Callable:
    """One denoiser forward over `batch` images as generate makes it: cond and uncond halves in one call."""
    from synthgen.condition import cond_uncond

    dtype = TORCH_DTYPES[cfg.dtype]
    cond = torch.stack(cycled(inputs.conditions, batch)).to(device, dtype)  # (B, D)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn((batch, *pack.config.denoiser.sample_shape), generator=gen).to(device, dtype)  # (B, C, H, W)
    t = torch.full((batch,), pack.config.schedule.num_train_timesteps / 2, device=device)  # mid-schedule
    null = bench_null(pack, inputs.conditions).to(device, dtype)
    return lambda: cond_uncond(pack.denoiser, x, t, cond, null, cfg.guidance)


def bench_null(pack, conditions: torch.Tensor) -> torch.Tensor:
    """The pack's null condition; zeros for a pack without one (the same work: only throughput is measured)."""
    from synthgen.condition import resolve_null

    null = resolve_null(pack.config.denoiser.null_condition, pack.null_condition, conditions.float())
    return torch.zeros(conditions.shape[1]) if null is None else null.cpu()


def batch_stages(pack, inputs: StageInputs, cfg: BenchConfig, batch: int, device: torch.device,
                 flops: dict, peak: float) -> list[StageResult]:
    """encode, denoise_step, vae_decode and filter at `batch`, each timed alone."""
    from synthgen.bank import to_float_chw
    from synthgen.filtering import cosine_scores

    dtype = TORCH_DTYPES[cfg.dtype]
    cond = torch.stack(cycled(inputs.conditions, batch)).to(device)  # (B, D) float32
    pixels = torch.from_numpy(np.stack(cycled(list(inputs.generated), batch))).to(device)
    pixels = pixels.permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, H, W) in [0, 1]
    real = cycled(inputs.real, batch)
    enc = pack.encoder

    def encode():  # what build_bank's flush does for one batch
        px = torch.cat([enc.preprocess(to_float_chw(img).to(device, dtype)) for img in real])
        return enc.embed(px).float().cpu()

    def filt():  # one transfer of the scores per batch, as generate makes
        return cosine_scores(enc(pixels.to(dtype)), cond).cpu()

    guided = 2 if cfg.guidance != 1.0 else 1
    stages = [("encode", encode, flops["encoder"], ""),
              ("denoise_step", denoise_call(pack, inputs, cfg, batch, device), flops["denoiser"] * guided,
               f"one forward over {guided * batch} rows (cond+uncond)" if guided == 2 else "no CFG")]
    if pack.vae is not None:
        # Random latents: the decoder's cost does not depend on the values.
        gen = torch.Generator().manual_seed(batch)
        latents = torch.randn((batch, *pack.config.denoiser.sample_shape), generator=gen).to(device, dtype)
        stages.append(("vae_decode", lambda: pack.vae(latents), flops.get("vae"), ""))
    stages.append(("filter", filt, flops["encoder"], "encoder + cosine"))
    out = []
    with torch.inference_mode():
        for name, fn, f, note in stages:
            out.append(stage_result(name, batch, batch, timed(fn, device, cfg.warmup, cfg.repeats), f, peak, note))
    return out


def cpu_image_encoders(fmt: str) -> list[str]:
    """The host JPEG/WebP/PNG encoders `shards.encode_image` can use here for `fmt`."""
    from synthgen.encode import HAS_SIMPLEJPEG

    return ["simplejpeg", "pillow"] if fmt == "jpg" and HAS_SIMPLEJPEG else ["pillow"]


def io_stages(images: np.ndarray, cfg: BenchConfig, work: Path, count: int, device: torch.device) -> list[StageResult]:
    """image_encode per host encoder (one thread) and write (one shard of `count` samples, commit included)."""
    from synthgen.encode import encode_image, resolve_image_encoder
    from synthgen.shards import SampleRecord, ShardWriter, sample_key

    pixels = cycled(list(images), count)
    cpu, used = torch.device("cpu"), resolve_image_encoder("auto", cfg.format, device)
    out = []
    for name in cpu_image_encoders(cfg.format):
        times = timed(lambda: [encode_image(p, cfg.format, cfg.quality, name) for p in pixels], cpu, cfg.warmup,
                      cfg.repeats)
        role = "generate's" if name == used else "the naive baseline's" if name == "pillow" else "available"
        out.append(stage_result("image_encode", None, count, times,
                                note=f"{name} ({role}), {cfg.format} q{cfg.quality}, 1 thread"))
    blobs = [encode_image(p, cfg.format, cfg.quality, "pillow") for p in pixels]
    folder, shard = work / "write", iter(range(10**6))
    folder.mkdir(parents=True, exist_ok=True)

    def write():
        k = next(shard)
        with ShardWriter(folder, k) as writer:
            for i, blob in enumerate(blobs):
                key = sample_key(k, i)
                meta = {"key": key, "sample_id": i, "seed": i, "label": i % 10, "score": 0.5, "steps": 4}
                writer.add(SampleRecord(key, blob, cfg.format, i % 10, meta))

    times = timed(write, cpu, cfg.warmup, cfg.repeats)
    shutil.rmtree(folder, ignore_errors=True)
    size = sum(len(b) for b in blobs) / len(blobs)
    note = f"1 tar of {count}, ~{size / 1024:.1f} KiB/img, fsync"
    return out + [stage_result("write", None, count, times, note=note)]


# ---- Naive baseline --------------------------------------------------------------------------------------


def diffusers_scheduler(sampler: str, schedule: NoiseSchedule):
    """The diffusers scheduler that `synthgen.samplers` reimplements for `sampler` (same schedule)."""
    import diffusers

    base = dict(num_train_timesteps=schedule.num_train_timesteps, beta_schedule=schedule.beta_schedule,
                beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                timestep_spacing=schedule.spacing(sampler), steps_offset=schedule.steps_offset)
    if schedule.prediction_type == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps,
                                                         shift=schedule.flow_shift)
    pred = dict(prediction_type=schedule.prediction_type)
    clip = dict(clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range)
    if sampler == "ddpm":
        return diffusers.DDPMScheduler(**base, **pred, **clip, variance_type="fixed_small")
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**base, **pred, **clip, set_alpha_to_one=schedule.set_alpha_to_one)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**base, **pred, solver_order=2, algorithm_type="dpmsolver++",
                                                     final_sigmas_type="zero")
    return diffusers.EulerDiscreteScheduler(**base, **pred, final_sigmas_type="zero")


@torch.no_grad()
def naive_call(pack, cond: torch.Tensor, cfg: BenchConfig, steps: int, gen: torch.Generator,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """One pipeline call, diffusers style: cond (b, D) float32 -> ((b, H, W, 3) uint8, (b,) scores).

    Under CFG the uncond and cond rows go through the denoiser as one batch of 2b, as diffusers'
    StableDiffusionPipeline does; the scheduler steps in Python. The networks run in the dtype `pack`
    was loaded in.
    """
    from synthgen.filtering import cosine_scores

    dtype, b = next(pack.denoiser.parameters()).dtype, cond.shape[0]
    scheduler = diffusers_scheduler(cfg.sampler, pack.config.schedule)
    scheduler.set_timesteps(steps, device=device)
    flow = pack.config.schedule.prediction_type == "flow"
    x = torch.randn((b, *pack.config.denoiser.sample_shape), generator=gen).to(device)
    x = x if flow else x * scheduler.init_noise_sigma
    guided = cfg.guidance != 1.0
    c = cond.to(dtype)
    if guided:
        c = torch.cat([bench_null(pack, cond).to(device, dtype).expand(b, -1), c])
    for t in scheduler.timesteps:
        xin = (x if flow else scheduler.scale_model_input(x, t)).to(dtype)
        xin = torch.cat([xin, xin]) if guided else xin
        out = pack.denoiser(xin, t.to(torch.float32).expand(xin.shape[0]), c).float()
        if guided:
            uncond, out = out.chunk(2)
            out = uncond + cfg.guidance * (out - uncond)
        x = scheduler.step(out, t, x, generator=gen).prev_sample
    images = pack.vae(x.to(dtype)).float() if pack.vae is not None else x
    pixels = ((images.nan_to_num(0.0) + 1) / 2).clamp(0, 1)
    scores = cosine_scores(pack.encoder(pixels.to(dtype)), cond)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(), scores.cpu().numpy()


def run_naive(pack, inputs: StageInputs, cfg: BenchConfig, steps: int, out: Path, device: torch.device) -> float:
    """Generate cfg.n images naively into one shard; returns seconds (model already loaded)."""
    from synthgen.encode import encode_image
    from synthgen.shards import SampleRecord, ShardWriter, sample_key

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with ShardWriter(out, 0) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # diffusers' numpy-2 deprecations, not ours
        for first in range(0, cfg.n, cfg.naive_batch):
            ids = np.arange(first, min(first + cfg.naive_batch, cfg.n))
            cond = inputs.conditions[ids % len(inputs.conditions)].to(device)
            images, scores = naive_call(pack, cond, cfg, steps, gen, device)
            for row, i in enumerate(ids):
                key, label = sample_key(0, int(i)), int(inputs.labels[i % len(inputs.labels)])
                meta = {"key": key, "sample_id": int(i), "label": label, "score": float(scores[row]), "steps": steps}
                blob = encode_image(images[row], cfg.format, cfg.quality, "pillow")  # a PIL save per image
                writer.add(SampleRecord(key, blob, cfg.format, label, meta))
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


# ---- End to end --------------------------------------------------------------------------------------------


def run_e2e(pack_dir: Path, bank_dir: Path, cfg: BenchConfig, steps: int, batch: int, n: int,
            out: Path) -> tuple[int, float, float]:
    """The real `run_generate` with the bench's settings: (images, seconds excluding load, wall seconds)."""
    from synthgen.pack import read_pack_config
    from synthgen.pipeline import run_generate

    # A pack without a null (an imported UNet) is timed with zeros as the null: the same work (see bench_null).
    null = "zeros" if read_pack_config(pack_dir).denoiser.null_condition == "none" else "pack"
    gcfg = GenerateConfig(
        n=n, out=out, pack=pack_dir, bank=bank_dir, sampler=cfg.sampler, steps=steps, guidance=cfg.guidance, null=null,
        format=cfg.format, quality=cfg.quality, dtype=cfg.dtype, batch=batch, decode_batch=cfg.decode_batch,
        filter_batch=cfg.filter_batch, device=cfg.device, backend=cfg.backend, overwrite=True, progress=False,
    )
    start = time.perf_counter()
    summary = run_generate(gcfg)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return summary.images, getattr(summary, "seconds", wall), wall


# ---- The whole run -------------------------------------------------------------------------------------------


def environment(cfg: BenchConfig, device: torch.device, argv: list[str] | None) -> dict:
    from synthgen.export.manifest import cpu_native_bf16, device_info
    from synthgen.runstate import versions

    return {
        "device": device_info(device), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "dtype": cfg.dtype, "versions": versions(),
        "platform": platform.platform(), "cpu_bf16": cpu_native_bf16(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "command": " ".join(["synthgen", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def component_flops(pack_dir: Path) -> dict[str, float]:
    """component -> FLOPs per image for one forward (the denoiser: one step, no guidance)."""
    from synthgen.flops import pack_costs
    from synthgen.pack import read_pack_config

    return {c.name: float(c.flops) for c in pack_costs(read_pack_config(pack_dir))}


def image_flops(flops: dict[str, float], steps: int, cfg: float, denoise_only: bool = False) -> float:
    """FLOPs of one finished image: steps x denoiser (x2 under CFG) + VAE decode + filter re-encode."""
    denoise = steps * flops["denoiser"] * (2 if cfg != 1.0 else 1)
    return denoise if denoise_only else denoise + flops.get("vae", 0.0) + flops["encoder"]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print, argv: list[str] | None = None) -> BenchResult:
    """Every measurement of the module docstring, in one process; temporary files are removed."""
    from synthgen.runtime import resolve_device

    device, dtype = resolve_device(cfg.device), TORCH_DTYPES[cfg.dtype]
    env = environment(cfg, device, argv)
    with tempfile.TemporaryDirectory(prefix="synthgen-bench-") as tmp, engine_cache(Path(tmp) / "engines"):
        work = Path(tmp)
        log(f"measuring the {cfg.matmul_size}^3 matmul peak ...")
        peaks = {d: matmul_peak(TORCH_DTYPES[d], cfg.matmul_size, device)
                 for d in dict.fromkeys(("fp32", cfg.dtype, cfg.naive_precision))}
        pack_dir, source = prepare_pack(cfg, work)
        images_spec = cfg.images or write_photo_folder(work / "images")
        bank_dir = prepare_bank(pack_dir, images_spec, work, device, dtype)
        result = _measure(cfg, pack_dir, bank_dir, images_spec, work, device, peaks, log)
        result.pack["source"] = source
    result.environment = {**env, "load_avg_end": [round(v, 2) for v in os.getloadavg()]}
    return result


def _measure(cfg, pack_dir, bank_dir, images_spec, work, device, peaks, log) -> BenchResult:
    from synthgen.bank import load_bank
    from synthgen.pack import load_pack

    dtype, peak = TORCH_DTYPES[cfg.dtype], peaks[cfg.dtype]
    flops = component_flops(pack_dir)
    pack = load_pack(pack_dir, device=device, dtype=dtype)
    bank = load_bank(bank_dir)
    result = BenchResult(
        config={**asdict(cfg), "pack": str(cfg.pack) if cfg.pack else None},
        environment={}, peak_gflops={k: v / 1e9 for k, v in peaks.items()},
        pack={"name": pack.config.name, "random_weights": pack.config.random_weights,
              "image_size": pack.config.image_size, "has_vae": pack.vae is not None, "hash": pack.hash,
              "gflop_per_img": {k: v / 1e9 for k, v in flops.items()}, "bank_size": len(bank.keys)},
    )
    log("decode ...")
    decode, real = time_decode(images_spec, cfg, device, pack.config.encoder.resize, result.notes)
    result.stages += decode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # Images the pack really generates (fewest steps) feed filter, image encode and write.
        cond = torch.stack(cycled(list(bank.embeddings.float()), max(cfg.batches))).to(device)
        generated, _ = naive_call(pack, cond, cfg, min(cfg.steps), torch.Generator().manual_seed(1), device)
    inputs = StageInputs(real, generated, bank.embeddings.float(), bank.labels)
    staged = {}  # batch -> the pack as generate runs it at that batch
    for batch in cfg.batches:
        log(f"model stages at batch {batch} ...")
        staged[batch] = _stage_pack(pack, cfg, batch, device, result)
        result.stages += batch_stages(staged[batch], inputs, cfg, batch, device, flops, peak)
    log("image encode and write ...")
    # As many samples as one shard of the end-to-end run holds, so the shard's fsync is amortized alike.
    result.stages += io_stages(generated, cfg, work, min(cfg.n, GEN["shard_size"].default), device)
    naive = pack if cfg.naive_precision == cfg.dtype else load_pack(
        pack_dir, device=device, dtype=TORCH_DTYPES[cfg.naive_precision])
    result.end_to_end = _end_to_end(cfg, naive, inputs, pack_dir, bank_dir, work, device, flops, peaks, staged, log)
    return result


def _stage_pack(eager, cfg: BenchConfig, batch: int, device, result: BenchResult):
    """The pack as generate runs it at `batch`: eager, or a copy whose modules are the backends (built
    once, time recorded); the eager pack is left as it is."""
    if cfg.backend == "eager":
        return eager
    from synthgen.engines import engine_components
    from synthgen.scheduler import BatchSizes

    start = time.perf_counter()
    # Every stage at `batch`, as the stage table times them (the end-to-end runs build their own engines
    # when --decode-batch / --filter-batch differ).
    backends = engine_components(eager, device, BatchSizes(batch, batch, batch, (batch,)), None, cfg.backend,
                                 cfg.dtype, cfg.guidance)
    result.build_seconds[str(batch)] = round(time.perf_counter() - start, 2)
    return dataclasses.replace(eager, **backends)


def _end_to_end(cfg, pack, inputs, pack_dir, bank_dir, work, device, flops, peaks, staged, log) -> list[EndToEnd]:
    """Rows of (steps, batch). A row's numbers are measured back to back (naive for these steps, then per
    batch synthgen and its denoise-only ceiling), so load drifting on a shared machine moves whole rows
    rather than the ratios within one. `pack`: the eager pack the naive loop drives, in its dtype."""
    run_naive(pack, inputs, _with_n(cfg, cfg.naive_batch), min(cfg.steps), work / "naive", device)  # warm-up
    for batch in cfg.batches:
        run_e2e(pack_dir, bank_dir, cfg, min(cfg.steps), batch, batch, work / "warm")  # first-call costs
    rows = []
    for steps in cfg.steps:
        log(f"naive baseline, {steps} steps, batch {cfg.naive_batch} ...")
        naive = cfg.n / statistics.median(
            [run_naive(pack, inputs, cfg, steps, work / "naive", device) for _ in range(cfg.e2e_repeats)])
        for batch in cfg.batches:
            log(f"end to end, {steps} steps, batch {batch} ...")
            step = denoise_call(staged[batch], inputs, cfg, batch, device)
            # The denoise-only ceiling is timed right before and right after the run it is compared with.
            step_times = _timed_inference(step, device, cfg)
            runs = [run_e2e(pack_dir, bank_dir, cfg, steps, batch, cfg.n, work / "run") for _ in range(cfg.e2e_repeats)]
            step_times += _timed_inference(step, device, cfg)
            images, seconds, wall = sorted(runs, key=lambda r: r[1])[len(runs) // 2]
            ips, only = images / seconds, batch / statistics.median(step_times) / steps
            f, denoise_f = image_flops(flops, steps, cfg.guidance), image_flops(flops, steps, cfg.guidance, denoise_only=True)
            rows.append(EndToEnd(
                steps=steps, batch=batch, decode_batch=cfg.decode_batch or batch,
                filter_batch=cfg.filter_batch or batch, n=images, images_per_s=ips, seconds=seconds,
                wall_seconds=wall, denoise_only_images_per_s=only, fraction_of_denoise_only=ips / only,
                denoise_flop_share=denoise_f / f, naive_images_per_s=naive, naive_batch=cfg.naive_batch,
                naive_dtype=cfg.naive_precision, ratio_vs_naive=ips / naive,
                naive_share_of_peak=f * naive / peaks[cfg.naive_precision],
                ratio_bound=peaks[cfg.dtype] / (f * naive), gflop_per_img=f / 1e9,
                share_of_peak=f * ips / peaks[cfg.dtype]))
    return rows


def _timed_inference(fn: Callable[[], object], device: torch.device, cfg: BenchConfig) -> list[float]:
    with torch.inference_mode():
        return timed(fn, device, cfg.warmup, cfg.repeats)


def _with_n(cfg: BenchConfig, n: int) -> BenchConfig:
    return BenchConfig(**{**asdict(cfg), "n": n})


# ---- Reporting ---------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def table_lines(r: BenchResult) -> list[str]:
    """The terminal table: header, per-stage rows, end-to-end rows with the naive ratio."""
    c, e, p = r.config, r.environment, r.pack
    dev = e["device"]
    peaks = "  ".join(f"{k} {v:.1f} GFLOP/s" for k, v in r.peak_gflops.items())
    g = p["gflop_per_img"]
    lines = [
        f"pack     {p['name']} ({p['source']}{', random weights' if p['random_weights'] else ''}), "
        f"{p['image_size']} px, bank of {p['bank_size']}",
        f"run      backend {c['backend']}, {c['dtype']}, {c['sampler']}, cfg {c['guidance']}, {c['format']} q{c['quality']}",
        f"machine  {dev['type']} {dev['name']}, {e['cpu_cores']} cores, {e['torch_threads']} torch threads "
        f"(OMP_NUM_THREADS={e['omp_num_threads']}), load {e['load_avg_start'][0]} -> {e['load_avg_end'][0]}",
        f"peak     {peaks} ({c['matmul_size']}^3 matmul, measured now)",
        "GFLOP    " + "  ".join(f"{k} {v:.4f}/img" + (" per step" if k == "denoiser" else "") for k, v in g.items()),
        "",
        f"{'stage':<13} {'batch':>5} {'images/s':>10} {'ms/call':>9} {'GFLOP/img':>10} {'% peak':>7}  note",
    ]
    for s in r.stages:
        share = None if s.share_of_peak is None else 100 * s.share_of_peak
        lines.append(f"{s.stage:<13} {_num(s.batch, 'd'):>5} {s.images_per_s:>10.1f} {s.seconds * 1e3:>9.2f} "
                     f"{_num(s.gflop_per_img, '.4f'):>10} {_num(share):>7}  {s.note}")
    chunks = ", ".join(f"{name} batch {c[key]}" for name, key in (("decode", "decode_batch"),
                                                                  ("filter", "filter_batch")) if c.get(key))
    lines += [
        "",
        f"end to end: {c['n']} images per run (synthgen run_generate{', ' + chunks if chunks else ''} vs naive "
        f"diffusers-style loop at batch {c['naive_batch']}, eager {c.get('naive_dtype') or c['dtype']})",
        f"{'steps':>5} {'batch':>5} {'synthgen/s':>11} {'denoise-only/s':>15} {'e2e/denoise':>12} {'bound':>6} "
        f"{'naive/s':>9} {'synthgen/naive':>15} {'bound':>6} {'GFLOP/img':>10} {'% peak':>7}",
    ]
    for x in r.end_to_end:
        lines.append(f"{x.steps:>5} {x.batch:>5} {x.images_per_s:>11.1f} {x.denoise_only_images_per_s:>15.1f} "
                     f"{x.fraction_of_denoise_only:>11.0%} {x.denoise_flop_share:>6.0%} {x.naive_images_per_s:>9.1f} "
                     f"{x.ratio_vs_naive:>14.2f}x {x.ratio_bound:>5.1f}x {x.gflop_per_img:>10.4f} "
                     f"{100 * x.share_of_peak:>7.1f}")
    if r.end_to_end:
        lines += [
            "bounds: e2e/denoise <= the denoiser's share of an image's FLOPs, if decode and filter ran at the "
            "denoiser's FLOP rate on the same device;",
            "        synthgen/naive <= synthgen at 100% of the matmul peak in its dtype / the naive loop's FLOP rate",
        ]
    if r.build_seconds:
        lines.append("engine build s per batch (apart from all timings): " + ", ".join(
            f"b{k}: {v}" for k, v in r.build_seconds.items()))
    lines += [f"note: {n}" for n in r.notes]
    return lines


def markdown(r: BenchResult) -> str:
    """A results file: the command, the machine and its load, then the table verbatim."""
    e = r.environment
    return "\n".join([
        f"# synthgen bench: {r.pack['name']} on {e['device']['type']}", "",
        f"- command: `{e['command']}`",
        f"- started {e['started']}; load average {e['load_avg_start']} at start, {e['load_avg_end']} at end "
        f"({e['cpu_cores']} cores, {e['torch_threads']} torch threads, OMP_NUM_THREADS={e['omp_num_threads']})",
        f"- torch {e['versions']['torch']}, {e['platform']}; native CPU bf16: {e['cpu_bf16']}",
        "- images/s: median of the repeats after warm-up; end to end excludes model loading", "",
        "```", *table_lines(r), "```", "",
    ])


def write_json(r: BenchResult, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r.to_dict(), indent=1, allow_nan=False) + "\n")


def write_plot(r: BenchResult, path: Path) -> str:
    """Throughput vs batch (stages) and vs steps (end to end, naive); a message when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib), so {path} was not written"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        rows = [s for s in r.stages if s.stage == stage and s.batch is not None]
        if rows:
            left.plot([s.batch for s in rows], [s.images_per_s for s in rows], marker="o", label=stage)
    left.set(xscale="log", yscale="log", xlabel="batch", ylabel="images/s", title="stages vs batch",
             xticks=list(r.config["batches"]), xticklabels=[str(b) for b in r.config["batches"]])
    for batch in r.config["batches"]:
        rows = [x for x in r.end_to_end if x.batch == batch]
        right.plot([x.steps for x in rows], [x.images_per_s for x in rows], marker="o", label=f"synthgen b{batch}")
    rows = [x for x in r.end_to_end if x.batch == r.config["batches"][0]]
    right.plot([x.steps for x in rows], [x.naive_images_per_s for x in rows], marker="x", ls="--",
               label=f"naive b{r.config['naive_batch']} {rows[0].naive_dtype if rows else ''}")
    right.set(xscale="log", yscale="log", xlabel="steps", ylabel="images/s", title="end to end vs steps",
              xticks=list(r.config["steps"]), xticklabels=[str(s) for s in r.config["steps"]])
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
