"""Moving batches between the device stage and the shard's decisions, and nothing else.

On CUDA the device stage runs in its own thread (it mostly queues kernels, so the host work overlaps),
at most QUEUE_DEPTH batches ahead of the decisions; on the CPU it runs inline in the calling thread
(`--overlap`). On the CPU the device stage IS the cores: torch in a second Python thread starts a second
OpenMP team beside the one model loading created, and libgomp, now managing more threads than there are
cores, throttles its spin-waits, so each of the many short parallel regions of a small bf16 forward waits
for sleeping workers. bench/bench_overlap.py (2 cores, small preset, fresh process per run): bf16 batch 8
inline 1.76x the device thread; batch 32 and fp32 within noise (0.96-1.04x).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from dataclasses import dataclass

import numpy as np

from synthgen.render import Cancelled, RenderedBatch, render_batch
from synthgen.runtime import Runtime

QUEUE_DEPTH = 2  # device batches computed ahead of the decisions: enough to hide a slow decision or write


@dataclass
class _Failed:
    exc: BaseException


class InlineStream:
    """A shard's candidates in id order, each batch computed in the calling thread when `next()` asks for
    it; the same interface as CandidateStream (no look-ahead, nothing to stop)."""

    def __init__(self, rt: Runtime, first_id: int, budget: int) -> None:
        self.rt, self.first_id, self.budget = rt, first_id, budget
        self._limit = self._done = 0

    def want(self, upto: int) -> None:
        self._limit = max(self._limit, min(upto, self.budget))

    def next(self) -> RenderedBatch:
        if self._done >= self._limit:
            raise RuntimeError(f"next() past the wanted candidates ({self._limit}); call want() first")
        stop = min(self._limit, self._done + self.rt.sizes.unit)
        ids = self.first_id + np.arange(self._done, stop, dtype=np.int64)
        batch = render_batch(self.rt, ids)
        self._done = stop
        return batch

    def close(self) -> None:
        pass


def open_stream(rt: Runtime, first_id: int, budget: int) -> "InlineStream | CandidateStream":
    """The shard's candidate stream for `rt.cfg.overlap` (auto: a device thread on CUDA only)."""
    overlap = rt.cfg.overlap
    if overlap == "auto":
        overlap = "thread" if rt.device.type == "cuda" else "inline"
    return (CandidateStream if overlap == "thread" else InlineStream)(rt, first_id, budget)


class CandidateStream:
    """A shard's candidates in id order, computed by a background device thread in batches of
    `rt.sizes.unit` rows, at most QUEUE_DEPTH batches ahead of the consumer.

    The consumer raises the limit with `want(upto)` as it learns how many candidates it needs; the thread
    never computes ids at or past it, nor past the shard's budget. `close()` stops the thread at the next
    denoiser step and joins it. Batch boundaries never change a sample's image, so running ahead in
    other chunks than a serial loop would have used changes nothing in the shard.
    """

    def __init__(self, rt: Runtime, first_id: int, budget: int) -> None:
        self.rt, self.first_id, self.budget = rt, first_id, budget
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

    def next(self) -> RenderedBatch:
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
                    stop = min(self._limit, done + self.rt.sizes.unit)
                ids = self.first_id + np.arange(done, stop, dtype=np.int64)
                self._put(render_batch(self.rt, ids, cancel=self.cancel))
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
