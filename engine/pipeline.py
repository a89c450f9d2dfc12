"""generate: embedding bank -> planned conditions -> denoiser x K -> decode -> filter -> shards.

Data flows one way, through three kinds of workers joined by bounded queues:

  device stage    plan(ids) -> conditions + noise (pure functions of run seed and id) -> sample() with
                  CFG on the representation -> VAE decode -> re-encode and score, each stage in bucketed
                  chunks of its own size (scheduler.py) -> NaN/Inf rows retried once in higher precision
                  -> one transfer per batch -> queue (at most QUEUE_DEPTH batches ahead)
  calling thread  group decisions in id order -> submit the kept images to the encoder pool -> write
                  encoded samples in decision order, at most ENCODE_DEPTH groups behind -> commit
  encoder pool    JPEG (nvJPEG, simplejpeg or Pillow), WebP, PNG

So on CUDA the device works on batch i+1 while the pool encodes and the calling thread writes batch i, and memory
is bounded by the queue depths, never by --n. A shard is the unit of work: `generate_shard` needs only
the engine, the config and the shard index.

The device stage runs in its own thread on CUDA (it mostly queues kernels, so the host work overlaps) and
inline in the calling thread on the CPU (`--overlap`). On the CPU the device stage IS the cores: torch in
a second Python thread starts a second OpenMP team beside the one model loading created, and libgomp,
now managing more threads than there are cores, throttles its spin-waits, so each of the many short
parallel regions of a small bf16 forward waits for sleeping workers. bench/bench_overlap.py (2 cores,
small preset, fresh process per run): bf16 batch 8 inline 1.76x the device thread; batch 32 and fp32
within noise (0.96-1.04x). Overlapping encode and write cannot win that back on the CPU (they are well
under 1 % of a batch there); the encoder pool still runs beside the calling thread.
"""

from __future__ import annotations

import contextvars
import copy
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from synthgen import storage
from synthgen.bank import Bank, check_bank_fits_pack, load_bank
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.filtering import accept_group
from synthgen.kernels.dispatch import cosine_filter, guided_step
from synthgen.models.denoiser import cond_uncond, null_kind, resolve_null
from synthgen.noise import STREAM_INIT, STREAM_STEP0, gaussian
from synthgen.pack import Pack, load_pack
from synthgen.plan import Planner, SamplePlan, conditions
from synthgen.samplers import SamplerPlan, make_plan, sample
from synthgen.scheduler import STAGES, AdaptiveBatch, BatchSizes, finite_rows, pad_rows, retry_dtype, run_chunked
from synthgen.shards import (
    SampleRecord, ShardWriter, encode_image, encode_jpeg_cuda, resolve_image_encoder, sample_key, shard_path,
    stats_path, write_stats,
)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUEUE_DEPTH = 2  # device batches computed ahead of the decisions: enough to hide a slow decision or write
ENCODE_DEPTH = 2  # decided groups being encoded while older ones are written


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_bank_path(cfg: GenerateConfig) -> Path:
    if cfg.bank is not None:
        return cfg.bank
    if (cfg.pack / "bank" / "bank.json").is_file():
        return cfg.pack / "bank"
    raise UsageError(
        f"no --bank given and pack {cfg.pack} ships no bank/ folder; build one with "
        f"'synthgen embed --images DIR --pack {cfg.pack} --out BANK' and pass --bank BANK"
    )


def encode_workers(cfg: GenerateConfig) -> int:
    """Image-encoding threads: --encode-workers, else half the cores (the device thread and the writer
    need the rest), at least 2 and at most 8."""
    return cfg.encode_workers or min(8, max(2, (os.cpu_count() or 2) // 2))


# ---- Engine: everything loaded once per process ---------------------------------------------------


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
class Engine:
    cfg: GenerateConfig
    pack: Pack
    bank: Bank
    planner: Planner
    sampler: SamplerPlan
    device: torch.device
    dtype: torch.dtype
    embeddings: torch.Tensor  # (N, D) bank on the device
    null: torch.Tensor | None  # (D,) on the device; None without guidance on a pack that has no null
    sizes: BatchSizes
    image_encoder: str  # "nvjpeg" | "simplejpeg" | "pillow"
    batches: dict[str, AdaptiveBatch]  # working chunk size per stage, shrunk by out-of-memory errors
    retry: Models | None = None  # built on the first non-finite row
    restored: bool = False  # working sizes taken over from earlier processes on the run folder (once)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.pack.config.denoiser.sample_shape

    @property
    def models(self) -> Models:
        return Models(self.pack.denoiser, self.pack.vae, self.pack.encoder, self.dtype)

    @property
    def oom_backoffs(self) -> int:
        return sum(b.backoffs for b in self.batches.values())


def load_engine(cfg: GenerateConfig) -> Engine:
    device = resolve_device(cfg.device)
    dtype = TORCH_DTYPES[cfg.dtype]
    bank = load_bank(resolve_bank_path(cfg))
    pack = load_pack(cfg.pack, device=device, dtype=dtype)
    sizes = cfg.batch_sizes
    if cfg.engine is not None or cfg.backend != "eager":
        from synthgen.engines import attach_engines  # swaps pack.denoiser/vae/encoder for engine-backed callables

        attach_engines(pack, device, sizes, cfg.engine, cfg.backend, cfg.dtype, cfg.cfg)
    check_bank_fits_pack(bank, pack.config, cfg.pack)
    planner = Planner(bank.labels, bank.class_names, cfg.plan_config)
    sampler = make_plan(cfg.sampler, pack.config.schedule, cfg.steps, device=device)
    embeddings = bank.embeddings.to(device)
    null = resolve_null(null_kind(pack.config.denoiser.null_condition, cfg.null), pack.null_condition, embeddings)
    return Engine(
        cfg, pack, bank, planner, sampler, device, dtype, embeddings, null, sizes,
        resolve_image_encoder(cfg.image_encoder, cfg.format, device),
        {stage: AdaptiveBatch(stage, sizes.of(stage)) for stage in STAGES},
    )


def retry_models(engine: Engine) -> Models:
    """Copies of the eager networks in the retry precision (scheduler.retry_dtype), made on first use:
    a non-finite row is rare, and the copies cost memory."""
    if engine.retry is None:
        dtype = retry_dtype(engine.dtype)
        with torch.inference_mode(False):  # plain parameters, not inference tensors
            denoiser, vae, encoder = (_copy_in(m, dtype) for m in (engine.pack.denoiser, engine.pack.vae,
                                                                    engine.pack.encoder))
        engine.retry = Models(denoiser, vae, encoder, dtype)
    return engine.retry


def _copy_in(module, dtype: torch.dtype):
    if module is None:
        return None
    eager = getattr(module, "eager", module)  # an engine-backed component keeps its eager module
    return copy.deepcopy(eager).to(dtype).eval().requires_grad_(False)


def run_identity(engine: Engine) -> dict:
    return {**engine.cfg.identity(), "pack_hash": engine.pack.hash, "bank_hash": engine.bank.hash}


# ---- One batch on the device ----------------------------------------------------------------------


class Cancelled(Exception):
    """The shard no longer needs this batch: the device thread stops at the next denoiser step."""


@dataclass
class BatchResult:
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
def generate_batch(engine: Engine, sample_ids: np.ndarray, keep_pixels: bool = False,
                   cancel: threading.Event | None = None) -> BatchResult:
    plan = engine.planner.plan(sample_ids)
    seeds = torch.from_numpy(plan.seeds).to(engine.device)
    cond = conditions(engine.embeddings, plan, engine.cfg.lam, seeds)  # (B, D) float32
    pixels, valid, scores = _render(engine, engine.models, seeds, cond, cancel)
    retried = torch.zeros_like(valid)
    # The guard reads the valid mask on the host: one small sync per batch, right before the batch's
    # single transfer anyway; the retry itself only runs when a row is bad.
    bad = np.flatnonzero(~valid.cpu().numpy())
    if len(bad):
        rows = torch.from_numpy(bad).to(engine.device)
        p2, v2, s2 = _render(engine, retry_models(engine), seeds[rows], cond[rows], cancel)
        pixels = pixels.index_copy(0, rows, torch.where(v2.view(-1, 1, 1, 1), p2, pixels[rows]))
        scores = scores.index_copy(0, rows, torch.where(v2, s2, scores[rows]))
        valid, retried = valid.index_copy(0, rows, v2), retried.index_fill(0, rows, True)
    as_uint8 = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)
    on_device = engine.image_encoder == "nvjpeg"
    return BatchResult(
        plan=plan,
        images=None if on_device else as_uint8.cpu().numpy(),
        scores=scores.cpu().numpy(),
        valid=valid.cpu().numpy(),
        cond=cond.cpu().numpy(),
        retried=retried.cpu().numpy(),
        pixels=pixels.cpu() if keep_pixels else None,
        device_images=as_uint8.contiguous() if on_device else None,
    )


def _render(engine: Engine, models: Models, seeds: torch.Tensor, cond: torch.Tensor, cancel):
    """seeds (n,) int64, cond (n, D) float32 -> pixels (n, 3, H, W) float32 in [0, 1], valid (n,) bool,
    scores (n,) float32 (nan where not valid). Everything stays on the device."""
    x0 = _denoise(engine, models, seeds, cond, cancel)
    images = _decode(engine, models, x0)
    valid = finite_rows(images)
    pixels = ((images.nan_to_num(0.0) + 1) / 2).clamp(0, 1).float()
    scores = _score(engine, models, pixels, cond)
    valid = valid & torch.isfinite(scores)
    return pixels, valid, torch.where(valid, scores, torch.full_like(scores, float("nan")))


def _chunked(engine: Engine, stage: str, n: int, fn) -> torch.Tensor:
    """fn(start, stop, padded) over [0, n) in the stage's bucketed chunks, concatenated."""
    parts = run_chunked(fn, n, engine.batches[stage], engine.sizes.buckets)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _denoise(engine: Engine, models: Models, seeds: torch.Tensor, cond: torch.Tensor, cancel) -> torch.Tensor:
    """-> x0 (n, *sample_shape) in models.state_dtype; padded rows repeat the last sample and are dropped."""

    def chunk(start: int, stop: int, padded: int) -> torch.Tensor:
        s, c = pad_rows(seeds[start:stop], padded), pad_rows(cond[start:stop], padded)
        return _sample(engine, models, s, c, cancel)[: stop - start]

    return _chunked(engine, "denoise", len(seeds), chunk)


def _sample(engine: Engine, models: Models, seeds: torch.Tensor, cond: torch.Tensor, cancel) -> torch.Tensor:
    cond_in = cond.to(models.dtype)
    null_in = None if engine.null is None else engine.null.to(models.dtype)
    shape, state, cfg_scale = engine.sample_shape, models.state_dtype, engine.cfg.cfg

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        out_cond, out_uncond = cond_uncond(models.denoiser, x.to(models.dtype), t, cond_in, null_in, cfg_scale)
        return out_cond.to(state), None if out_uncond is None else out_uncond.to(state)

    def step(plan, k, x, outputs, prev_x0, noise):
        # Guidance and the sampler update as one elementwise pass (a Triton kernel on CUDA).
        return guided_step(plan, k, x, outputs[0], outputs[1], cfg_scale, prev_x0, noise)

    def noise_fn(k: int) -> torch.Tensor:
        return gaussian(seeds, STREAM_STEP0 + k, shape, dtype=state)

    return sample(engine.sampler, model_fn, gaussian(seeds, STREAM_INIT, shape, dtype=state), noise_fn, step=step)


def _decode(engine: Engine, models: Models, x0: torch.Tensor) -> torch.Tensor:
    """x0 (n, *sample_shape) -> images (n, 3, H, W) in [-1, 1] (NaN/Inf possible), in x0's dtype."""
    if models.vae is None:
        return x0

    def chunk(start: int, stop: int, padded: int) -> torch.Tensor:
        return models.vae(pad_rows(x0[start:stop], padded).to(models.dtype))[: stop - start].to(x0.dtype)

    return _chunked(engine, "decode", len(x0), chunk)


def _score(engine: Engine, models: Models, pixels: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """pixels (n, 3, H, W) in [0, 1], cond (n, D) -> (n,) float32 cos(enc(x_hat), c), by the dispatcher's
    fused filter (the Triton kernel on CUDA). Decisions are taken later, per group of candidate ids."""

    def chunk(start: int, stop: int, padded: int) -> torch.Tensor:
        emb = models.encoder(pad_rows(pixels[start:stop], padded).to(models.dtype))
        scores, _mask, _indices, _count = cosine_filter(emb, pad_rows(cond[start:stop], padded))
        return scores[: stop - start]

    return _chunked(engine, "filter", len(pixels), chunk)


# ---- The device stage of one shard, in its own thread ----------------------------------------------


@dataclass
class _Failed:
    exc: BaseException


class InlineStream:
    """A shard's candidates in id order, each batch computed in the calling thread when `next()` asks for
    it; the same interface as CandidateStream (no look-ahead, nothing to stop)."""

    def __init__(self, engine: Engine, first_id: int, budget: int) -> None:
        self.engine, self.first_id, self.budget = engine, first_id, budget
        self._limit = self._done = 0

    def want(self, upto: int) -> None:
        self._limit = max(self._limit, min(upto, self.budget))

    def next(self) -> BatchResult:
        if self._done >= self._limit:
            raise RuntimeError(f"next() past the wanted candidates ({self._limit}); call want() first")
        stop = min(self._limit, self._done + self.engine.sizes.unit)
        ids = self.first_id + np.arange(self._done, stop, dtype=np.int64)
        batch = generate_batch(self.engine, ids)
        self._done = stop
        return batch

    def close(self) -> None:
        pass


def open_stream(engine: Engine, first_id: int, budget: int) -> "InlineStream | CandidateStream":
    """The shard's candidate stream for `engine.cfg.overlap` (auto: a device thread on CUDA only)."""
    overlap = engine.cfg.overlap
    if overlap == "auto":
        overlap = "thread" if engine.device.type == "cuda" else "inline"
    return (CandidateStream if overlap == "thread" else InlineStream)(engine, first_id, budget)


class CandidateStream:
    """A shard's candidates in id order, computed by a background device thread in batches of
    `engine.sizes.unit` rows, at most QUEUE_DEPTH batches ahead of the consumer.

    The consumer raises the limit with `want(upto)` as it learns how many candidates it needs; the thread
    never computes ids at or past it, nor past the shard's budget. `close()` stops the thread at the next
    denoiser step and joins it. Batch boundaries never change a sample's image, so running ahead in
    other chunks than a serial loop would have used changes nothing in the shard.
    """

    def __init__(self, engine: Engine, first_id: int, budget: int) -> None:
        self.engine, self.first_id, self.budget = engine, first_id, budget
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.cancel = threading.Event()
        self._limit = 0
        self._changed = threading.Condition()
        # copy_context: the thread sees the caller's context variables (e.g. kernels.triton_kernels()).
        run = contextvars.copy_context().run
        self.thread = threading.Thread(target=run, args=(self._produce,), name="synthgen-device", daemon=True)
        self.thread.start()

    def want(self, upto: int) -> None:
        """Allow candidates [0, upto) of the shard to be computed."""
        with self._changed:
            if upto > self._limit:
                self._limit = min(upto, self.budget)
                self._changed.notify_all()

    def next(self) -> BatchResult:
        """The next batch in id order; re-raises the device thread's error. Wakes up regularly so a signal
        handler in the main thread runs promptly."""
        while True:
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the device thread stopped without a result") from None
                continue
            if isinstance(item, _Failed):
                raise item.exc
            return item

    def close(self) -> None:
        self.cancel.set()
        with self._changed:
            self._changed.notify_all()
        self.thread.join()

    def _produce(self) -> None:
        done = 0
        try:
            while True:
                with self._changed:
                    while done >= self._limit and not self.cancel.is_set():
                        self._changed.wait()
                    if self.cancel.is_set():
                        return
                    stop = min(self._limit, done + self.engine.sizes.unit)
                ids = self.first_id + np.arange(done, stop, dtype=np.int64)
                self._put(generate_batch(self.engine, ids, cancel=self.cancel))
                done = stop
        except Cancelled:
            return
        except BaseException as exc:  # handed to the consumer, which raises it in the calling thread
            self._put(_Failed(exc))

    def _put(self, item) -> None:
        while not self.cancel.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


# ---- Encoding and writing, in decision order -------------------------------------------------------


@dataclass
class _Chosen:
    """A kept candidate with its final key, waiting for its encoded image."""

    key: str
    batch: BatchResult
    row: int


def encode_rows(items: list[_Chosen], fmt: str, quality: int, encoder: str) -> list[bytes]:
    """Encode the images of `items`, in order (runs in an encoder-pool thread)."""
    if encoder != "nvjpeg":
        return [encode_image(c.batch.images[c.row], fmt, quality, encoder) for c in items]
    out, i = [], 0
    while i < len(items):  # one batched nvJPEG call per run of rows from the same device batch
        j = i
        while j < len(items) and items[j].batch is items[i].batch:
            j += 1
        rows = torch.tensor([c.row for c in items[i:j]], device=items[i].batch.device_images.device)
        out += encode_jpeg_cuda(items[i].batch.device_images[rows], quality)
        i = j
    return out


class OrderedWriter:
    """Submits kept samples to the encoder pool and adds them to the shard in decision order.

    At most ENCODE_DEPTH decided groups are in the pool while older ones are written, so memory stays
    bounded and the tar's byte order is the decision order whatever the pool's timing. An encoder error
    is raised here, in the calling thread, and fails the shard (its temporary file is removed).
    """

    def __init__(self, engine: Engine, writer: ShardWriter, pool: ThreadPoolExecutor, workers: int) -> None:
        self.engine, self.writer, self.pool, self.workers = engine, writer, pool, workers
        self.inflight: deque[tuple[list[_Chosen], list[Future]]] = deque()

    def submit(self, items: list[_Chosen]) -> None:
        cfg, encoder = self.engine.cfg, self.engine.image_encoder
        # One slice per worker: a future per image would cost more than encoding a small JPEG.
        step = max(1, -(-len(items) // self.workers))
        futures = [self.pool.submit(encode_rows, items[i : i + step], cfg.format, cfg.quality, encoder)
                   for i in range(0, len(items), step)]
        self.inflight.append((items, futures))
        while len(self.inflight) > ENCODE_DEPTH:
            self._write_oldest()

    def drain(self) -> None:
        while self.inflight:
            self._write_oldest()

    def _write_oldest(self) -> None:
        items, futures = self.inflight.popleft()
        blobs = [blob for f in futures for blob in f.result()]
        cfg = self.engine.cfg
        for c, blob in zip(items, blobs):
            label = int(c.batch.plan.labels[c.row])
            cond = c.batch.cond[c.row].astype(np.float16) if cfg.save_cond else None
            meta = _meta(self.engine, c.batch, c.row, c.key)
            self.writer.add(SampleRecord(c.key, blob, cfg.format, label, meta, cond))


# ---- One shard -------------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Generated candidates waiting for their group's decision, in id order. A batch is released once all
    of its rows are taken, so only undecided rows hold memory."""

    rows: deque = field(default_factory=deque)  # (BatchResult, row)

    def add(self, batch: BatchResult) -> None:
        self.rows.extend((batch, r) for r in range(len(batch.scores)))

    def take(self, n: int) -> list[tuple[BatchResult, int]]:
        return [self.rows.popleft() for _ in range(min(n, len(self.rows)))]


def _meta(engine: Engine, batch: BatchResult, row: int, key: str) -> dict:
    p, bank, cfg = batch.plan, engine.bank, engine.cfg
    label = int(p.labels[row])
    anchors = [int(p.anchor_a[row])] + ([int(p.anchor_b[row])] if p.anchor_b[row] != p.anchor_a[row] else [])
    score = float(batch.scores[row])
    return {
        "key": key, "sample_id": int(p.sample_ids[row]), "seed": int(p.seeds[row]),
        "label": label, "class_name": bank.class_names[label],
        "anchors": anchors, "anchor_keys": [bank.keys[a] for a in anchors],
        "mode": cfg.mode, "lambda": cfg.lam, "mix": float(p.mix[row]),
        "score": None if np.isnan(score) else round(score, 6),
        "sampler": cfg.sampler, "steps": cfg.steps, "cfg": cfg.cfg, "pack": engine.pack.hash,
    }


STAT_KEYS = ("count", "candidates", "rejected", "nonfinite", "retried", "surplus", "unused")


def generate_shard(engine: Engine, shard: int, encoders: ThreadPoolExecutor | None = None,
                   on_images=None) -> dict | None:
    """Generate, filter and commit shard `shard`; returns its stats (also written as the done marker).

    Candidates come from the shard's own id range [shard * budget, (shard + 1) * budget) in order;
    decisions are made per fixed group of ids, so the shard's content does not depend on batch size,
    look-ahead or encoder timing. `encoders`: a thread pool to encode on (one is made when None).
    A URL run folder: the shard is written to a local staging folder, then uploaded tar first, stats
    last (storage.py); None when another writer committed it meanwhile (nothing is uploaded then).
    """
    out = engine.cfg.out
    if not engine.restored:
        restore_batch_sizes(engine)
    with storage.shard_staging(out, engine.cfg.staging) as run_dir:
        stats = _write_shard(engine, shard, run_dir, encoders, on_images)
        if storage.is_remote(out) and not storage.publish_shard(out, run_dir, shard):
            return None
    return stats


def device_name(device: torch.device) -> str:
    """What out-of-memory sizes are remembered per: the GPU model, or the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def restore_batch_sizes(engine: Engine) -> None:
    """Start each stage at the size earlier processes on this run folder backed off to on this device.

    Called on the engine's first shard, once the run folder is known to hold this run (a resumed run
    would otherwise meet the same out-of-memory error in its first chunk again).
    """
    from synthgen.runfolder import remembered_batch_sizes

    for stage, size in remembered_batch_sizes(engine.cfg, device_name(engine.device)).items():
        engine.batches[stage].resume_at(size)
    engine.restored = True


def _write_shard(engine: Engine, shard: int, run_dir: Path, encoders, on_images) -> dict:
    cfg, fcfg = engine.cfg, engine.cfg.filter_config
    target, budget = cfg.shard_target(shard), cfg.candidate_budget
    group = fcfg.decision_group
    stats_path(run_dir, shard).unlink(missing_ok=True)  # regenerating: the old marker no longer holds
    counts, per_class = Counter(), Counter()
    pending, received, start, backoffs = _Candidates(), 0, time.perf_counter(), engine.oom_backoffs
    grouped = fcfg.keep_top is not None  # keep-top ranks a whole group; other rules judge one at a time
    workers = encode_workers(cfg)
    with ExitStack() as stack:  # on any error, in reverse: stop the device, drop the tmp file, stop the pool
        pool = encoders or stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="encode"))
        writer = stack.enter_context(ShardWriter(run_dir, shard))
        stream = open_stream(engine, shard * budget, budget)
        stack.callback(stream.close)
        out = OrderedWriter(engine, writer, pool, workers)
        while counts["count"] < target and (received < budget or pending.rows):
            ready = len(pending.rows) >= group if grouped else bool(pending.rows)
            if received < budget and not ready:
                need = budget - received if fcfg.active else target - counts["count"]
                stream.want(received + need)
                batch = stream.next()
                pending.add(batch)
                received += len(batch.scores)
                continue
            # A full group, every pending candidate (independent rules), or the tail of the budget.
            decided = pending.take(group if grouped else len(pending.rows))
            keep = _decide(decided, fcfg)
            room = target - counts["count"]
            if not grouped and keep.sum() > room:
                # Candidates past the one that filled the shard were computed but never judged.
                cut = int(np.flatnonzero(keep)[room - 1]) + 1
                counts["unused"] += len(decided) - cut
                decided, keep = decided[:cut], keep[:cut]
            counts["candidates"] += len(decided)
            counts["nonfinite"] += sum(not b.valid[r] for b, r in decided)
            counts["retried"] += sum(bool(b.retried[r]) for b, r in decided)
            counts["rejected"] += int((~keep).sum())
            chosen = [d for d, k in zip(decided, keep) if k]
            counts["surplus"] += max(0, len(chosen) - room)
            items = [_Chosen(sample_key(shard, counts["count"] + i), b, r) for i, (b, r) in enumerate(chosen[:room])]
            out.submit(items)
            counts["count"] += len(items)
            per_class.update(int(c.batch.plan.labels[c.row]) for c in items)
            if on_images is not None:
                on_images(len(items), len(decided))
        counts["unused"] += len(pending.rows)
        stream.close()  # look-ahead past the shard's last decision is not needed: free the device now
        out.drain()
        with signals_deferred():  # the tar and its done marker land together, or neither does
            info = writer.commit()
            stats = {
                "shard": shard, "target": target, **{k: int(counts[k]) for k in STAT_KEYS},
                "exhausted": counts["count"] < target, "first_candidate_id": shard * budget,
                "per_class": {str(k): v for k, v in sorted(per_class.items())},
                "sha256": info["sha256"], "bytes": info["bytes"],
                "seconds": round(time.perf_counter() - start, 3),
                "image_encoder": engine.image_encoder, "oom_backoffs": engine.oom_backoffs - backoffs,
                "batch_sizes": {stage: b.size for stage, b in engine.batches.items()},
                "configured_batch_sizes": {stage: engine.sizes.of(stage) for stage in engine.batches},
                "device": device_name(engine.device),
            }
            write_stats(run_dir, shard, stats)
    return stats


def _decide(decided: list[tuple[BatchResult, int]], fcfg) -> np.ndarray:
    """(n,) bool: kept candidates. Without a filter rule only non-finite images are dropped."""
    valid = np.array([b.valid[r] for b, r in decided], dtype=bool)
    if not fcfg.active:
        return valid
    scores = np.array([b.scores[r] for b, r in decided], dtype=np.float32)
    labels = np.array([b.plan.labels[r] for b, r in decided], dtype=np.int64)
    return accept_group(np.nan_to_num(scores, nan=-2.0), labels, valid, fcfg)


# ---- A run ------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    run_dir: Path
    shards_written: list[int]
    shards_skipped: int
    images: int
    candidates: int
    rejected: int
    nonfinite: int
    exhausted: list[int]
    seconds: float
    removed_tmp: list[Path]
    complete: bool
    retried: int = 0
    oom_backoffs: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        acc = self.images / self.candidates if self.candidates else 1.0
        out = [
            f"run folder      {self.run_dir}",
            f"shards written  {len(self.shards_written)} (skipped {self.shards_skipped} already complete)",
            f"images          {self.images} in {self.seconds:.1f} s ({self.images_per_second:.2f} img/s)",
            f"candidates      {self.candidates} (accepted {acc:.1%}, rejected {self.rejected}, "
            f"non-finite {self.nonfinite})",
        ]
        if self.retried or self.oom_backoffs:
            out.append(f"recovered       {self.retried} non-finite candidate(s) retried in higher precision; "
                       f"{self.oom_backoffs} out-of-memory batch reduction(s)")
        if self.removed_tmp:
            out.append(f"cleaned         {len(self.removed_tmp)} stray temporary file(s) from an interrupted run")
        if self.exhausted:
            out.append(
                f"WARNING         shard(s) {self.exhausted[:10]} ran out of candidates before reaching their "
                "target: lower --min-score / raise --keep-top, or raise --max-oversample"
            )
        out.append(f"dataset         {'complete' if self.complete else 'incomplete'}; check it with "
                   f"'synthgen verify {self.run_dir}'")
        return out


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the open shard was abandoned (tmp file removed, claim released)."""

    def __init__(self, signum: int, committed: int = 0) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.committed = signum, committed

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextmanager
def stop_on_signals():
    """Turn the first SIGINT/SIGTERM into `Interrupted` in the main thread; later ones are ignored so the
    cleanup (abandon the open shard, aggregate dataset.json) runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            if _gate.deferring:
                _gate.pending = signum  # raised by signals_deferred when the commit is done
                return
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _gate.pending = None
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class _SignalGate:
    deferring: bool = False
    pending: int | None = None


_gate = _SignalGate()  # signal handlers run in the main thread only, so one gate serves the process


@contextmanager
def signals_deferred():
    """A commit's critical section: a SIGINT/SIGTERM arriving inside is raised as `Interrupted` when it
    ends. Without it, a signal between a shard's rename and its stats file leaves a tar without its done
    marker: never counted as committed (resume redoes it), but work thrown away and a confusing folder."""
    outer = _gate.deferring
    _gate.deferring = True
    try:
        yield
    except BaseException:
        _gate.deferring = outer
        if not outer:
            _gate.pending = None  # the error itself stops the run
        raise
    _gate.deferring = outer
    if not outer and _gate.pending is not None:
        signum, _gate.pending = _gate.pending, None
        raise Interrupted(signum)


def check_guidance(cfg: GenerateConfig, pack_null: str) -> None:
    """Guidance needs an unconditional input; a pack imported without a learned null has none to give."""
    if cfg.cfg != 1.0 and null_kind(pack_null, cfg.null) == "none":
        raise UsageError(
            f"--cfg {cfg.cfg:g} needs an unconditional input, and pack {cfg.pack} has no learned null condition "
            "(its denoiser was imported without one). Name one with --null zeros or --null mean (the bank's mean "
            "embedding), or generate without guidance (--cfg 1, the default)"
        )


def describe_run(cfg: GenerateConfig) -> tuple[dict, dict, list[str]]:
    """(identity, dataset.json header, class names), checked without loading any weights.

    Validates what `load_engine` would (pack config, bank, bank fits pack, plan), so a Ray driver
    refuses a bad run before it starts actors.
    """
    from synthgen.pack import pack_hash, read_pack_config
    from synthgen.runfolder import versions

    config = read_pack_config(cfg.pack)
    bank = load_bank(resolve_bank_path(cfg))
    check_bank_fits_pack(bank, config, cfg.pack)
    check_guidance(cfg, config.denoiser.null_condition)
    Planner(bank.labels, bank.class_names, cfg.plan_config)
    identity = {**cfg.identity(), "pack_hash": pack_hash(config), "bank_hash": bank.hash}
    header = {
        "config": cfg.to_dict(), "versions": versions(), "pack_hash": identity["pack_hash"],
        "bank_hash": bank.hash, "class_names": bank.class_names, "random_weights": config.random_weights,
        "image_size": config.image_size,
    }
    return identity, header, bank.class_names


# ---- Executors: who runs the pending shards ----------------------------------------------------------


def run_claimed_shard(engine: Engine, shard: int, encoders=None, on_images=None, block: bool = False) -> dict | None:
    """Claim `shard`, then generate it unless it is committed by now; None when it is not ours to write.

    The claim (runfolder.claim_shard) keeps two processes off one shard; checking for the stats file
    after claiming keeps a shard another process just committed from being rewritten.
    """
    from synthgen.runfolder import claim_shard

    if storage.is_remote(engine.cfg.out):
        # No claims on a URL: jobs own disjoint --shards ranges; publish_shard re-checks before uploading.
        return None if is_committed(engine.cfg.out, shard) else generate_shard(engine, shard, encoders, on_images)
    claim = claim_shard(engine.cfg.out, shard, block=block)
    if claim is None:
        return None
    with claim:
        if is_committed(engine.cfg.out, shard):
            return None
        return generate_shard(engine, shard, encoders, on_images)


def is_committed(run_dir: Path | str, shard: int) -> bool:
    if storage.is_remote(run_dir):
        return storage.is_committed(run_dir, shard)
    return stats_path(run_dir, shard).is_file() and shard_path(run_dir, shard).is_file()


def run_shards(engine: Engine, shards: list[int], on_images=None):
    """Generate every shard of `shards` this process can claim; yields each one's stats.

    Shards another live process holds are waited for at the end (and redone if it died meanwhile), so
    when this returns every shard of the list is committed, by this process or another.
    """
    held = []
    with ThreadPoolExecutor(encode_workers(engine.cfg), thread_name_prefix="encode") as encoders:
        for shard in shards:
            stats = run_claimed_shard(engine, shard, encoders, on_images)
            if stats is not None:
                yield stats
            elif not is_committed(engine.cfg.out, shard):
                held.append(shard)
        for shard in held:
            stats = run_claimed_shard(engine, shard, encoders, on_images, block=True)
            if stats is not None:
                yield stats


class LocalExecutor:
    """Runs shards in this process with one engine (loaded once, here)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        if (cfg.workers or 1) > 1:
            raise UsageError(
                f"--workers {cfg.workers} needs --executor ray (pip install 'synthgen[ray]'); without Ray, start "
                "one 'synthgen generate' per worker on the same --out: shard claims split the work"
            )
        self.engine = load_engine(cfg)

    def run(self, shards: list[int], on_images):
        yield from run_shards(self.engine, shards, on_images)

    def close(self) -> None:
        pass


def make_executor(cfg: GenerateConfig):
    """The executor for `cfg.executor`; both share `run(shards, on_images) -> iterator of stats` and `close()`."""
    if cfg.executor == "ray":
        from synthgen.distributed import RayExecutor

        return RayExecutor(cfg)
    return LocalExecutor(cfg)


def run_generate(cfg: GenerateConfig) -> RunSummary:
    """Resume or start the run described by `cfg`: generate every pending shard in range, then aggregate.

    SIGINT/SIGTERM raise `Interrupted` once the open shard is abandoned and dataset.json is updated.
    """
    from synthgen.runfolder import finalize_run, pending_shards, prepare_run_dir

    with stop_on_signals():
        identity, header, class_names = describe_run(cfg)
        executor = make_executor(cfg)
        try:
            removed = prepare_run_dir(cfg, identity, header)
            todo = pending_shards(cfg)
            results, t0 = _execute(cfg, executor, todo, class_names)
        finally:
            executor.close()
        doc = finalize_run(cfg, class_names)
    start, stop = cfg.shards or (0, cfg.num_shards)
    return RunSummary(
        run_dir=cfg.out,
        shards_written=[r["shard"] for r in results],
        shards_skipped=len(range(start, min(stop, cfg.num_shards))) - len(results),
        images=sum(r["count"] for r in results),
        candidates=sum(r["candidates"] for r in results),
        rejected=sum(r["rejected"] for r in results),
        nonfinite=sum(r["nonfinite"] for r in results),
        exhausted=[r["shard"] for r in results if r["exhausted"]],
        retried=sum(r.get("retried", 0) for r in results),
        oom_backoffs=sum(r.get("oom_backoffs", 0) for r in results),
        seconds=time.perf_counter() - t0,
        removed_tmp=removed,
        complete=doc["complete"],
    )


def _execute(cfg: GenerateConfig, executor, todo: list[int], class_names: list[str]) -> tuple[list[dict], float]:
    """Run `todo` through the executor with a progress bar; on an interrupt, aggregate what is committed."""
    from tqdm import tqdm

    from synthgen.runfolder import finalize_run

    seen = Counter()
    bar = tqdm(total=sum(cfg.shard_target(k) for k in todo), desc="generate", unit="img",
               disable=not cfg.progress, dynamic_ncols=True)

    def on_images(accepted: int, decided: int) -> None:
        seen["accepted"] += accepted
        seen["decided"] += decided
        bar.update(accepted)
        bar.set_postfix(accept=f"{seen['accepted'] / max(seen['decided'], 1):.0%}", refresh=False)

    results, t0 = [], time.perf_counter()
    try:
        for stats in executor.run(todo, on_images):
            results.append(stats)
    except Interrupted as exc:
        exc.committed = len(results)
        finalize_run(cfg, class_names)
        raise
    finally:
        bar.close()
    return results, t0
