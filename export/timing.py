"""The one timing harness: wall seconds of a call after warm-up, the device's queued work included.

Used by `synthgen bench`, the backend checks of an engine build and the scripts under bench/. On CUDA,
`events=True` times with CUDA events (the device time between two markers, no host overhead); otherwise
each call is followed by a synchronize, so a timing never stops while kernels are still queued.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for `device`'s queued work (None: the current CUDA device, when there is one)."""
    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        torch.cuda.synchronize()
    elif device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None, warmup: int = 1,
          repeats: int = 3, events: bool = False) -> list[float]:
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    use_events = events and device is not None and torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable[[], object], device: torch.device | str | None = None, warmup: int = 1,
                   repeats: int = 3, events: bool = False) -> float:
    """The median of `timed`."""
    return statistics.median(timed(fn, device, warmup, repeats, events))
