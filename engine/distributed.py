"""Ray executor: shards as work units on a pool of Ray actors, each holding one loaded runtime.

The driver hands one shard at a time to each idle actor; an actor claims the shard in the run folder
(localfolder.py), generates it with `shard_job.generate_shard` and returns its stats. So:
- one runtime load per actor (and one GPU per actor with --gpus-per-worker 1);
- the run folder is shared state that needs no coordinator: claims keep two writers off one shard, also
  against other drivers or plain `synthgen generate` processes on the same folder;
- an actor that dies (node lost, OOM, kill -9) gives its shard back: the kernel drops its claim, the
  driver starts a replacement actor and the shard is queued again, up to MAX_ATTEMPTS times;
- images are a pure function of (run identity, sample id), so the result equals a local run's.
The run folder must be a path every actor sees (a local disk for one machine, or a shared POSIX file
system with working `flock`, e.g. NFSv4 or Lustre mounted with -o flock), or an fsspec URL (s3://,
gs://). A URL has no locks, and none are needed here: this driver is the only one handing out shards and
gives each to one live actor at a time; an actor stages its shard locally and uploads it tar first, stats
last (urlfolder.py), so a shard whose actor died mid-upload is simply not committed and is redone.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import replace

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.runstate import run_folder
from synthgen.runtime import load_runtime
from synthgen.shard_job import run_claimed_shard
from synthgen.stats import ShardStats

MAX_ATTEMPTS = 3  # a shard whose actor died this many times fails the run (a bug, not bad luck)
CPUS_PER_ACTOR = 0.5  # fractional: two 1-CPU actors on a 2-CPU node starve Ray's own tasks (ENV-FACTS)


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            "--executor ray needs Ray: pip install 'synthgen[ray]' (or run without --executor ray, "
            "or start one 'synthgen generate --shards A:B' per machine)"
        ) from exc
    return ray


class ShardActor:
    """Holds one runtime; `run(shard)` claims and generates a shard and returns its stats (None: not ours)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        # A user error while loading (a bad pack, no CUDA) is raised by run(), so the driver reports it
        # once instead of restarting actors that would fail the same way.
        self.runtime, self.folder, self.error = None, run_folder(cfg), None
        try:
            self.runtime = load_runtime(cfg)
        except UsageError as exc:
            self.error = exc

    def pid(self) -> int:
        return os.getpid()

    def run(self, shard: int) -> ShardStats | None:
        if self.error is not None:
            raise self.error
        # block=True: a shard held by another live writer is waited for, then found committed (or redone).
        return run_claimed_shard(self.runtime, self.folder, shard, block=True)


class RayExecutor:
    """Runs shards on `workers` Ray actors; `run(shards, on_images)` yields each committed shard's stats."""

    def __init__(self, cfg: GenerateConfig) -> None:
        self.ray = import_ray()
        self.owns_ray = not self.ray.is_initialized()  # a Ray this process started is shut down on close()
        if self.owns_ray:
            self.ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
        resources = self.ray.cluster_resources()
        self.gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else float(resources.get("GPU", 0) > 0)
        if cfg.device == "cuda" and self.gpus == 0:
            raise UsageError("--device cuda with --executor ray needs --gpus-per-worker > 0 (a GPU per actor)")
        self.workers = cfg.workers or _default_workers(resources, self.gpus)
        # Actors run on their own node's device: "auto" picks its GPU when one was given to the actor.
        self.actor_cfg = replace(cfg, progress=False)
        self.actor_class = self.ray.remote(num_cpus=0 if self.gpus else CPUS_PER_ACTOR, num_gpus=self.gpus)(ShardActor)
        self.actors = [self._new_actor() for _ in range(self.workers)]

    def _new_actor(self):
        return self.actor_class.remote(self.actor_cfg)

    def run(self, shards: list[int], on_images):
        queue, attempts, running = deque(shards), {k: 0 for k in shards}, {}
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                actor, shard = idle.pop(), queue.popleft()
                running[actor.run.remote(shard)] = (actor, shard)
            done, _ = self.ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(done[0])
            stats = self._result(done[0], shard, attempts)
            if stats is _LOST:
                idle.append(self._replace(actor))
                queue.append(shard)
                continue
            idle.append(actor)
            if stats is not None:
                on_images(stats.count, stats.candidates)
                yield stats

    def _result(self, ref, shard: int, attempts: dict):
        """The shard's stats, None (another writer committed it), or _LOST when its actor died."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            attempts[shard] += 1
            if attempts[shard] >= MAX_ATTEMPTS:
                raise RuntimeError(f"shard {shard}: {MAX_ATTEMPTS} Ray actors died running it; last: {exc}") from exc
            return _LOST
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UsageError):  # a bad pack, a full disk on the actor's node: same message
                raise UsageError(str(cause)) from None
            raise

    def _replace(self, dead):
        self.actors.remove(dead)
        self.actors.append(self._new_actor())
        return self.actors[-1]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()


_LOST = object()


def _default_workers(resources: dict, gpus: float) -> int:
    if gpus > 0:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1)))
