"""SIGINT/SIGTERM as a clean stop: the open shard is abandoned (tmp file removed, claim released), the
run's dataset.json is rebuilt, and the process exits with the shell's code; a commit in progress finishes
first (`signals_deferred`).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass


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
