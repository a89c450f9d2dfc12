"""`GenerateConfig`: the one source of generate's defaults, validated once at the boundary; `BenchConfig`,
the bench's sweeps over the same settings, with generate's defaults.

The CLI, the bench and the Ray actors all build from these (a test checks the CLI defaults equal them).
Fields split in two:
the run's identity (what decides which image a sample id gets; a run folder refuses to resume under a
different identity) and execution settings (batch size, device, shard range) that never change images.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from synthgen.errors import UsageError
from synthgen.options import (
    BACKENDS, DEVICES, DTYPES, EXECUTORS, FORMATS, IMAGE_ENCODERS, NULL_CHOICES, OVERLAPS, PRESETS, SAMPLERS,
)
from synthgen.runfolder import is_remote, normalize_out

# Execution settings: changing them never changes which image a sample id gets. `engine` / `backend`
# run the same networks through another runtime: images match the eager run within the error the engine
# recorded against eager when it was built (manifest.json), not bitwise. `image_encoder` picks the JPEG
# library: the pixels encoded are the same, the compressed bytes differ between libraries (each shard's
# stats file names the encoder that wrote it).
EXECUTION_FIELDS = (
    "out", "pack", "bank", "batch", "device", "shards", "overwrite", "progress", "engine", "backend",
    "executor", "workers", "address", "gpus_per_worker", "batch_buckets", "decode_batch", "filter_batch",
    "encode_workers", "image_encoder", "staging", "overlap",
)
# Fields stored under another key in dataset.json and run identities: the names those files have always had.
STORED_KEYS = {"guidance": "cfg"}

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str | int) -> int:
    """'10k' -> 10000, '1M' -> 1000000, '1e6' -> 1000000, '2_500' -> 2500. Raises UsageError."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)([kmbg]?)", s)
        if not m:
            raise UsageError(f"--n {text!r} is not a count: use forms like 1000, 10k, 1M or 1e6")
        number = float(m.group(1)) * _SUFFIX[m.group(2)]
        if number != math.floor(number):
            raise UsageError(f"--n {text!r} is not a whole number of images")
        value = int(number)
    if value < 1:
        raise UsageError(f"--n must be at least 1, got {text!r}")
    return value


def parse_buckets(text: str | tuple | list | None) -> tuple[int, ...] | None:
    """'8,32,128' -> (8, 32, 128), sorted and unique; None or '' -> None. Raises UsageError."""
    if text is None or text == "" or text == ():
        return None
    parts = str(text).split(",") if isinstance(text, str) else list(text)
    try:
        sizes = {int(str(p).strip()) for p in parts if str(p).strip()}
    except ValueError:
        sizes = set()
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-buckets {text!r} must be comma-separated positive integers, e.g. 8,32,128")
    return tuple(sorted(sizes))


def parse_shard_range(text: str | None) -> tuple[int, int] | None:
    """'A:B' -> (A, B), half-open; 'A:' -> (A, None-like big); None -> None."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", str(text))
    if not m:
        raise UsageError(f"--shards {text!r} must look like A:B (half-open range of shard indices, e.g. 0:10)")
    start = int(m.group(1) or 0)
    stop = int(m.group(2)) if m.group(2) else 2**62
    if stop <= start:
        raise UsageError(f"--shards {text!r} is empty: B must be greater than A")
    return start, stop


@dataclass(frozen=True)
class GenerateConfig:
    n: int
    out: Path | str  # a local folder (Path), or an fsspec URL string such as s3://bucket/prefix (urlfolder.py)
    pack: Path | None = None  # default: the trained digits pack inside the package
    bank: Path | None = None  # default: the pack's own bank folder PACK/bank when it has one
    sampler: str | None = None  # None: the pack's (ddim for a distilled pack), else dpmpp_2m
    steps: int | None = None  # None: default_steps(pack), resolved once and recorded
    guidance: float = 1.0  # classifier-free guidance scale (--cfg; 1 = none), stored under the key "cfg"
    null: str = "pack"  # the unconditional input of guidance: the pack's | zeros | the bank's mean embedding
    mode: str = "reuse"
    lam: float = 0.0
    balance: str = "class"
    min_score: float | None = None
    keep_top: float | None = None
    keep_top_group: int = 100
    max_oversample: int = 8
    seed: int = 0
    shard_size: int = 1000
    format: str = "jpg"
    quality: int = 90
    save_cond: bool = False
    dtype: str = "auto"  # resolve_dtype: bf16 where the hardware has it, else fp32 (fp16 on old GPUs)
    batch: int | None = None  # denoiser rows per chunk; None: pack_defaults (never changes images)
    batch_buckets: tuple[int, ...] | None = None  # None: powers of two up to the largest stage batch
    decode_batch: int | None = None  # VAE decode rows per chunk; None: --batch
    filter_batch: int | None = None  # filter-encoder rows per chunk; None: --batch
    encode_workers: int | None = None  # image-encoding threads; None: from the CPU count
    image_encoder: str = "auto"  # JPEG encoder: nvjpeg on CUDA, else simplejpeg, else Pillow
    device: str = "auto"
    shards: tuple[int, int] | None = None
    overwrite: bool = False
    progress: bool = True
    engine: Path | None = None  # an engine folder from 'synthgen build-engine' (refused when stale)
    backend: str = "eager"  # without --engine: build engines for this backend into a cache on first use
    executor: str = "local"  # local: this machine | ray: Ray actors, one engine load each
    workers: int | None = None  # processes (local) or actors (ray); None: 1 local, one per GPU/CPU on Ray
    address: str | None = None  # Ray cluster address ("auto": the running one); None starts a local Ray
    gpus_per_worker: float | None = None  # Ray: GPUs per actor; None: 1 when the cluster has GPUs, else 0
    staging: Path | None = None  # URL --out: local folder shards are written in before upload; None: a temp dir
    overlap: str = "auto"  # device stages in a device thread (CUDA) or inline in the calling thread (CPU)

    def __post_init__(self):
        object.__setattr__(self, "n", parse_count(self.n))
        object.__setattr__(self, "out", normalize_out(self.out))
        object.__setattr__(self, "pack", resolve_pack(self.pack))
        if self.bank is not None:
            object.__setattr__(self, "bank", Path(self.bank))
        if isinstance(self.shards, str):
            object.__setattr__(self, "shards", parse_shard_range(self.shards))
        object.__setattr__(self, "batch_buckets", parse_buckets(self.batch_buckets))
        if self.sampler is None or self.steps is None or self.batch is None:
            sampler, steps, batch = pack_defaults(self.pack)
            object.__setattr__(self, "sampler", self.sampler or sampler)
            object.__setattr__(self, "steps", self.steps or steps)
            object.__setattr__(self, "batch", self.batch or batch)
        _choice("--sampler", self.sampler, SAMPLERS)
        _choice("--null", self.null, NULL_CHOICES)
        _choice("--format", self.format, FORMATS)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--device", self.device, DEVICES)
        # The dtype decides the images, so "auto" is resolved here, once: the run's identity records it.
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        _choice("--backend", self.backend, BACKENDS)
        _choice("--executor", self.executor, EXECUTORS)
        _choice("--image-encoder", self.image_encoder, IMAGE_ENCODERS)
        _choice("--overlap", self.overlap, OVERLAPS)
        if self.workers is not None:
            _at_least("--workers", self.workers, 1)
        if self.gpus_per_worker is not None and not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise UsageError(f"--gpus-per-worker must be a number >= 0, got {self.gpus_per_worker}")
        if self.executor == "local" and (self.address is not None or self.gpus_per_worker is not None):
            raise UsageError("--address and --gpus-per-worker are Ray options: add --executor ray")
        if self.staging is not None:
            object.__setattr__(self, "staging", Path(self.staging))
        if is_remote(self.out) and self.executor == "ray" and str(self.out).startswith("memory://"):
            # Every Ray actor is its own process, and a memory:// filesystem lives inside one process.
            raise UsageError(f"--executor ray cannot write to {self.out}: memory:// folders exist in one process "
                             "only; use a shared URL (s3://, gs://, file:// on a shared mount) or a local path")
        if self.engine is not None:
            object.__setattr__(self, "engine", Path(self.engine))
            if self.backend != "eager":
                raise UsageError("give --engine ENGINE_DIR or --backend, not both: the engine folder names its backend")
        _at_least("--steps", self.steps, 1)
        _at_least("--batch", self.batch, 1)
        for option, value in (("--decode-batch", self.decode_batch), ("--filter-batch", self.filter_batch),
                              ("--encode-workers", self.encode_workers)):
            if value is not None:
                _at_least(option, value, 1)
        _at_least("--max-oversample", self.max_oversample, 1)
        if not 1 <= self.shard_size <= 100_000:
            raise UsageError(f"--shard-size must be in [1, 100000] (keys hold 5 digits), got {self.shard_size}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be in [1, 100], got {self.quality}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise UsageError(f"--cfg must be a finite number >= 0 (1 = no guidance), got {self.guidance}")
        self.plan_config  # validates mode / lam / balance / seed
        self.filter_config  # validates min_score / keep_top / group

    # The stage configs import numpy / torch when first asked for, not when the CLI builds its help.
    @property
    def plan_config(self):
        from synthgen.plan import PlanConfig

        return PlanConfig(mode=self.mode, lam=self.lam, balance=self.balance, seed=self.seed)

    @property
    def filter_config(self):
        from synthgen.filtering import FilterConfig

        return FilterConfig(min_score=self.min_score, keep_top=self.keep_top, group=self.keep_top_group)

    @property
    def batch_sizes(self):
        """Per-stage chunk sizes and the buckets chunks are padded to (engine/scheduler.py)."""
        from synthgen.scheduler import BatchSizes, default_buckets

        decode, filt = self.decode_batch or self.batch, self.filter_batch or self.batch
        return BatchSizes(self.batch, decode, filt, self.batch_buckets or default_buckets(self.batch, decode, filt))

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_target(self, shard: int) -> int:
        """Exact number of images shard `shard` holds when complete."""
        return min(self.shard_size, self.n - shard * self.shard_size)

    @property
    def candidate_budget(self) -> int:
        """Candidate ids each shard owns: [shard * budget, (shard + 1) * budget)."""
        return self.shard_size * (self.max_oversample if self.filter_config.active else 1)

    def identity(self) -> dict:
        """The fields that decide the images (pack and bank hashes are added by the run folder).

        Fields added after runs were first written are left out at their defaults, so a folder written
        before them still resumes."""
        later = {"null": "pack"}
        return {STORED_KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)
                if f.name not in EXECUTION_FIELDS and not (f.name in later and getattr(self, f.name) == later[f.name])}

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> GenerateConfig:
        """The config `to_dict` wrote (dataset.json's "config"), with `overrides`; unknown keys are refused
        by the constructor, so a dataset.json from a newer synthgen says so."""
        stored = {v: k for k, v in STORED_KEYS.items()}
        known = {f.name for f in fields(cls)}
        values = {stored.get(k, k): v for k, v in d.items() if stored.get(k, k) in known}
        for name in ("shards", "batch_buckets"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict:
        d = {STORED_KEYS.get(k, k): v for k, v in asdict(self).items()}
        for k in ("out", "pack", "bank", "engine", "staging"):
            d[k] = None if d[k] is None else str(d[k])
        d["shards"] = list(self.shards) if self.shards else None
        d["batch_buckets"] = list(self.batch_buckets) if self.batch_buckets else None
        return d


# ---- synthgen bench: sweeps over generate's settings, with generate's defaults -------------------------

_GEN = GenerateConfig.__dataclass_fields__


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,4,25' -> (1, 4, 25): positive integers, duplicates dropped, order kept. Raises UsageError."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"{option} {text!r} must be comma-separated integers >= 1, e.g. 1,4,25") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text!r} must be comma-separated integers >= 1, e.g. 1,4,25")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class BenchConfig:
    pack: Path | None = None  # None and no preset: the default pack shipped inside synthgen
    preset: str | None = None  # a random-weight pack written to a temporary folder
    images: str | None = None  # real images for decode/encode (and the bank); None: photos from sklearn
    backend: str = "eager"
    dtype: str = _GEN["dtype"].default
    device: str = "auto"
    sampler: str = "dpmpp_2m"  # generate's for a pack that was not distilled
    steps: tuple[int, ...] = (1, 4, 20)
    batches: tuple[int, ...] = (8, 32)
    guidance: float = 2.0  # --cfg; guidance on: the denoiser then runs cond + uncond, the common generation setting
    n: int = 128  # images per end-to-end run (synthgen and naive)
    decode_batch: int | None = None  # end to end: VAE decode rows per chunk; None: the --batch of the row
    filter_batch: int | None = None  # end to end: filter-encoder rows per chunk; None: the --batch of the row
    naive_batch: int = 4
    naive_dtype: str | None = None  # None: the run dtype
    repeats: int = 5
    warmup: int = 1
    e2e_repeats: int = 1
    format: str = _GEN["format"].default
    quality: int = _GEN["quality"].default
    matmul_size: int = 2048

    def __post_init__(self):
        object.__setattr__(self, "n", parse_count(self.n))
        for name, option in (("steps", "--steps"), ("batches", "--batch")):
            value = getattr(self, name)
            value = parse_int_list(value, option) if isinstance(value, str) else tuple(value)
            if not value or not all(isinstance(v, int) and v >= 1 for v in value):
                raise UsageError(f"{option} needs integers >= 1, got {value!r}")
            object.__setattr__(self, name, value)
        for option, value in (("--decode-batch", self.decode_batch), ("--filter-batch", self.filter_batch)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise UsageError(f"{option} needs an integer >= 1, got {value!r}")
        if self.pack is not None and self.preset is not None:
            raise UsageError("give --pack or --preset, not both (--preset writes a random-weight pack)")
        if self.preset is not None and self.preset not in PRESETS:
            raise UsageError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        for option, value, allowed in (("--backend", self.backend, BACKENDS), ("--dtype", self.dtype, DTYPES),
                                       ("--naive-dtype", self.naive_precision, DTYPES),
                                       ("--device", self.device, DEVICES), ("--sampler", self.sampler, SAMPLERS),
                                       ("--format", self.format, FORMATS)):
            if value not in allowed:
                raise UsageError(f"{option} {value!r} is not one of {', '.join(allowed)}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.naive_dtype is not None:
            object.__setattr__(self, "naive_dtype", resolve_dtype(self.naive_dtype, self.device))
        for option, value, low in (("--naive-batch", self.naive_batch, 1), ("--repeats", self.repeats, 1),
                                   ("--warmup", self.warmup, 0), ("--e2e-repeats", self.e2e_repeats, 1),
                                   ("--matmul-size", self.matmul_size, 16)):
            if not isinstance(value, int) or value < low:
                raise UsageError(f"{option} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise UsageError(f"--cfg must be a finite number >= 0 (1 = no guidance), got {self.guidance}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be in [1, 100], got {self.quality}")

    @property
    def naive_precision(self) -> str:
        """The dtype the naive loop runs in: --naive-dtype, else the run's own."""
        return self.naive_dtype or self.dtype


# Steps when --steps is not given. The DiT packs synthgen trains were measured (bench/defaults_study.py,
# bench/results/defaults_cpu.md): 2 DPM-Solver++ steps train the study classifier as well as 20 (98.5 vs
# 98.4 % top-1, 3 seeds) at 11x the images/s; 1 DDIM step does not (11 %). Imported UNets were trained for
# 50-1000 step samplers and have not been measured here: they keep the common 20.
DEFAULT_STEPS = {"dit": 2, "unet2d": 20}


# Batch when --batch is not given: small samples (a 16 px pixel pack: 768 values) run fastest in big batches
# on 2 cores (1-step default pack: 2,450 img/s at 128, 2,900-3,500 at 512 and 1024); large latents and UNets
# keep 32, which fits a GPU and this machine's memory.
SMALL_SAMPLE, SMALL_BATCH, LARGE_BATCH = 1024, 512, 32


def pack_defaults(pack: Path) -> tuple[str, int, int]:
    """(sampler, steps, batch) when --sampler / --steps / --batch are not given: a distilled pack's sampler
    and steps (what it was distilled for), else dpmpp_2m at DEFAULT_STEPS for the pack's denoiser kind."""
    from synthgen.pack import read_pack_config

    try:
        config = read_pack_config(pack)
    except UsageError:
        return "dpmpp_2m", 20, LARGE_BATCH  # an unreadable pack is reported, with its fix, where it is read
    c, h, w = config.denoiser.sample_shape
    batch = SMALL_BATCH if c * h * w <= SMALL_SAMPLE else LARGE_BATCH
    if config.distilled:
        return config.distilled["sampler"], int(config.distilled["steps"]), batch
    return "dpmpp_2m", DEFAULT_STEPS.get(config.denoiser.kind, 20), batch


def resolve_dtype(dtype: str, device: str) -> str:
    """--dtype auto: bf16 where the hardware computes it natively (a GPU with bf16; a CPU with AVX-512 BF16
    or AMX), fp16 on a GPU without bf16, fp32 elsewhere (emulated bf16 runs 3-5x slower than fp32 there).
    Determinism holds per dtype and machine class: a bf16 run and an fp32 run are different data sets."""
    if dtype != "auto":
        return dtype
    import torch

    from synthgen.export.manifest import cpu_native_bf16

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_native_bf16() else "fp32"


def resolve_pack(pack: str | Path | None) -> Path:
    """--pack, or the default pack shipped inside the package."""
    from synthgen.pack import DEFAULT_PACK

    if pack is not None:
        return Path(pack)
    if not (DEFAULT_PACK / "pack.json").is_file():
        raise UsageError(
            f"no --pack given and the default pack is not installed at {DEFAULT_PACK}; rebuild it with "
            "'make default-pack' or pass --pack (e.g. one from 'synthgen pack random --preset tiny')"
        )
    return DEFAULT_PACK


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{option} {value!r} is not one of {', '.join(allowed)}")


def _at_least(option: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise UsageError(f"{option} must be an integer >= {low}, got {value!r}")
