"""Batch scheduler: fixed batch buckets, one batch size per stage, out-of-memory backoff, a NaN/Inf guard.

Plain functions and two small dataclasses; `render.py` drives them.

- Buckets. A chunk of n rows runs padded up to the smallest bucket >= n, so a compiled graph or a static
  engine only ever sees a few batch shapes. Padding repeats the chunk's last row (a real sample: no NaN
  paths, no special cases in the networks) and the padded rows are sliced off right after each stage,
  before anything is scored, filtered or written.
- Stage sizes. The denoiser, the VAE decoder and the filter encoder each walk the rows of a device batch
  in chunks of their own size: a VAE decode that needs 4x the memory of a denoiser step can run at a
  quarter of its batch while the denoiser keeps its large one.
- Out-of-memory backoff. A chunk that raises an out-of-memory error is retried at half the size; the
  smaller size is kept for the rest of the run (logged once per reduction), and a resumed run on the same
  device and configured size starts at it (shard_job.restore_batch_sizes). Which image a sample id gets
  never depends on the chunk size: its noise is a counter-based function of its own seed (noise.py).
- NaN/Inf guard. `retry_dtype` names the higher precision a non-finite row is retried in once; rows that
  stay non-finite are dropped by the pipeline and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from synthgen.errors import UsageError

log = logging.getLogger("synthgen.scheduler")

T = TypeVar("T")
STAGES = ("denoise", "decode", "filter")


@dataclass(frozen=True)
class BatchSizes:
    """Rows per chunk of each stage, and the bucket sizes chunks are padded up to."""

    denoise: int
    decode: int
    filter: int
    buckets: tuple[int, ...]

    @property
    def unit(self) -> int:
        """Rows one device batch takes from a shard's candidate stream: the largest stage size, so every
        stage can run at its own size inside it."""
        return max(self.denoise, self.decode, self.filter)

    def of(self, stage: str) -> int:
        return getattr(self, stage)


def default_buckets(*sizes: int) -> tuple[int, ...]:
    """Powers of two below the largest size, plus the sizes themselves: (32,) -> (1, 2, 4, 8, 16, 32).

    A tail chunk then wastes less than half its rows, and halving a power-of-two batch on out-of-memory
    lands on a bucket again.
    """
    top = max(sizes)
    powers = {1 << k for k in range(top.bit_length()) if 1 << k < top}
    return tuple(sorted(powers | set(sizes)))


def padded_size(n: int, buckets: tuple[int, ...], limit: int) -> int:
    """The smallest bucket b with n <= b <= limit, or n itself when no bucket fits.

    `limit` is the stage's working size: after an out-of-memory backoff the larger buckets are off limits.
    """
    return min((b for b in buckets if n <= b <= limit), default=n)


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, ...) -> (size, ...) by repeating the last row; size >= n >= 1."""
    n = x.shape[0]
    if size == n:
        return x
    return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])


# ---- Out-of-memory backoff ----


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA and other accelerators), or a RuntimeError whose message says so
    (torch's CPU allocator, MPS, ONNX Runtime and TensorRT wrappers)."""
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if t is not None)
    if types and isinstance(exc, types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class AdaptiveBatch:
    """The working chunk size of one stage: starts at the configured size, halves on out-of-memory and
    never grows back (a size that ran out of memory once will do so again on the next large batch)."""

    stage: str
    size: int
    backoffs: int = 0  # out-of-memory errors absorbed so far
    history: list[int] = field(default_factory=list)  # sizes given up, in order

    def back_off(self, exc: BaseException) -> None:
        """Halve the size after `exc`; re-raise it when there is nothing left to halve."""
        if self.size <= 1:
            raise UsageError(
                f"{self.stage}: out of memory at batch size 1; use a lower precision (--dtype bf16/fp16), a "
                f"smaller pack, or a device with more memory"
            ) from exc
        self.history.append(self.size)
        self.size //= 2
        self.backoffs += 1
        log.warning("%s: out of memory at batch %d, continuing at batch %d for the rest of the run",
                    self.stage, self.history[-1], self.size)
        _release_cached_memory()

    def resume_at(self, size: int) -> None:
        """Start at `size`, where an earlier process on this run folder ended after out-of-memory errors,
        instead of failing its first chunks again. Not counted as a backoff: nothing failed here."""
        if 1 <= size < self.size:
            log.warning("%s: starting at batch %d, where an earlier run on this folder ended after running out "
                        "of memory at %d on this device (give another --batch to try again)",
                        self.stage, size, self.size)
            self.history.append(self.size)
            self.size = size


def _release_cached_memory() -> None:
    # The failed chunk's tensors are garbage once the exception unwinds; hand the cache back so the retry
    # at half size does not trip over fragments of the larger one.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_chunked(fn: Callable[[int, int, int], T], n: int, batch: AdaptiveBatch, buckets: tuple[int, ...]) -> list[T]:
    """Call fn(start, stop, padded) over rows [0, n) in chunks of at most batch.size rows, in order.

    `padded` is the bucket the chunk [start, stop) is to be padded up to; fn returns the outputs of the
    real rows only. A chunk that runs out of memory is redone at half the size (`AdaptiveBatch`).
    """
    out, start = [], 0
    while start < n:
        stop = min(n, start + batch.size)
        try:
            out.append(fn(start, stop, padded_size(stop - start, buckets, batch.size)))
        except Exception as exc:  # only out-of-memory is absorbed; anything else propagates unchanged
            if not is_out_of_memory(exc):
                raise
            batch.back_off(exc)
            continue
        start = stop
    return out


# ---- NaN/Inf guard ----


def retry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a non-finite row is retried in once.

    fp16/bf16 runs retry in float32: overflow (fp16 tops out at 65504) and bf16's 8-bit mantissa are the
    usual sources of NaN/Inf, and float32 removes both. float32 runs retry in float64: rerunning the same
    float32 computation would repeat the same NaN bit for bit (the noise is a pure function of the seed),
    while float64's range and precision do rescue overflow and cancellation in the network. NaN weights
    stay NaN in any precision; those rows are dropped and counted.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) bool: rows without NaN/Inf. Stays on the device (no host sync)."""
    return torch.isfinite(x).flatten(1).all(dim=1)
