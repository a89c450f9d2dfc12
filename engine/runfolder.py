"""The run folder: `dataset.json` (identity + aggregated counts) beside the shards and their stats files.

Stats files are the truth (STYLE 11): `dataset.json` is rebuilt from them after every run, so it is
right whichever process or machine wrote which shard.

Several processes (or Ray actors, or SLURM jobs) may work on one folder at once. A shard is claimed
before it is written: `NNNNNN.lock` is held with an exclusive `flock` for as long as the shard is open,
and removed after its stats file is written. The kernel drops the lock when its holder dies (kill -9
included), so a lock file left behind by a dead process is free to claim again: no pid checks, no
break-the-stale-lock race. The file's content (pid, host, time) only says who holds it, for messages.
`.run.lock` serialises the short folder-wide steps (create/reopen, cleanup, aggregation).

A URL run folder (s3://, gs://, memory://, file://...) has no locks: storage.py holds its commit
protocol, what it supports concurrently (disjoint --shards ranges) and why that is safe. dataset.json's
identity is read, compared and written the same way for both.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import socket
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from synthgen import storage
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.shards import completed_shards, json_bytes, read_stats, shard_path, stats_path, write_json_atomic

RUN_FORMAT = "synthgen-run/1"
DATASET_JSON = "dataset.json"
RUN_LOCK = ".run.lock"
_SHARD_FILE_RE = re.compile(r"^(\d{6})\.(tar|tar\.tmp|stats\.json\.\d+\.tmp|lock)$")


# ---- Claims: one writer per shard, across processes -----------------------------------------------


def lock_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / f"{shard:06d}.lock"


class ShardClaim:
    """An exclusive claim on one shard; `release()` removes the lock file, then drops the lock."""

    def __init__(self, shard: int, path: Path, fd: int) -> None:
        self.shard, self.path, self._fd = shard, path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock: a process blocked on the old file sees its inode vanish
        # and retries on a fresh file (see `_lock_file`), so two holders never coexist.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ShardClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _lock_file(path: Path, block: bool) -> int | None:
    """An fd holding an exclusive flock on `path` (created if needed), or None when held elsewhere."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder released (and unlinked) it between our open and flock: try again


def claim_shard(run_dir: Path, shard: int, block: bool = False) -> ShardClaim | None:
    """Claim `shard` for writing; None when another live process holds it (block=True waits instead)."""
    path = lock_path(run_dir, shard)
    fd = _lock_file(path, block)
    if fd is None:
        return None
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": round(time.time(), 3)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return ShardClaim(shard, path, fd)


def lock_holder(run_dir: Path, shard: int) -> str:
    """Who holds the shard's lock, for messages: 'pid 123 on host h' (or 'another process')."""
    try:
        owner = json.loads(lock_path(run_dir, shard).read_text())
        return f"pid {owner['pid']} on host {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def run_lock(run_dir: Path):
    """Serialise folder-wide steps (create/reopen, cleanup, aggregation) between processes."""
    fd = os.open(Path(run_dir) / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _shard_files(run_dir: Path) -> dict[int, list[Path]]:
    """Every shard's tar, temporary files and lock file, by shard index."""
    found: dict[int, list[Path]] = {}
    for p in sorted(run_dir.iterdir()):
        m = _SHARD_FILE_RE.match(p.name)
        if m and p.is_file():
            found.setdefault(int(m.group(1)), []).append(p)
    return found


def remove_uncommitted(run_dir: Path) -> list[Path]:
    """Delete what no live process is writing and was never committed; returns the files removed.

    Per shard: `.tmp` files, a tar without a stats file, and a stale lock file -- but only when its
    claim can be taken, so the open shard of another live process is left alone. Other `*.tmp` files
    (dataset.json's) are written under the run lock, which the caller holds.
    """
    removed = [p for p in sorted(run_dir.glob("*.tmp")) if not _SHARD_FILE_RE.match(p.name)]
    for p in removed:
        p.unlink(missing_ok=True)
    for shard, paths in _shard_files(run_dir).items():
        if _stray(run_dir, shard, paths) or any(p.suffix == ".lock" for p in paths):
            removed += _remove_if_free(run_dir, shard)
    return removed


def _stray(run_dir: Path, shard: int, paths: list[Path]) -> list[Path]:
    committed = stats_path(run_dir, shard).exists()
    return [p for p in paths if p.name.endswith(".tmp") or (p.suffix == ".tar" and not committed)]


def _remove_if_free(run_dir: Path, shard: int) -> list[Path]:
    claim = claim_shard(run_dir, shard)
    if claim is None:
        return []  # another live process is writing this shard
    with claim:  # releasing removes the (possibly stale) lock file too
        stray = _stray(run_dir, shard, _shard_files(run_dir).get(shard, []))
        for p in stray:
            p.unlink(missing_ok=True)
    return stray


def held_shards(run_dir: Path) -> list[int]:
    """Shards whose lock a live process holds right now."""
    held = []
    for shard, paths in _shard_files(run_dir).items():
        if any(p.suffix == ".lock" for p in paths):
            claim = claim_shard(run_dir, shard)
            if claim is None:
                held.append(shard)
            else:
                claim.release()
    return held


def versions() -> dict:
    import diffusers
    import numpy
    import timm
    import torch
    import webdataset

    import synthgen

    return {
        "synthgen": synthgen.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "timm": timm.__version__, "numpy": numpy.__version__, "webdataset": getattr(webdataset, "__version__", "?"),
        "python": platform.python_version(),
    }


def read_dataset_json(run_dir: Path | str) -> dict | None:
    path = storage.join(run_dir, DATASET_JSON)
    raw = storage.read_bytes(run_dir, DATASET_JSON)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); rerun with --overwrite to start this folder afresh") from e


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj, default=str))


def prepare_run_dir(cfg: GenerateConfig, identity: dict, header: dict) -> list[Path]:
    """Create or reopen `cfg.out` for this identity; returns the stray temporary files it removed.

    A folder written under a different identity is refused (resuming it would mix two datasets), unless
    --overwrite, which deletes only synthgen's own files there (refused while another process writes).
    """
    if storage.is_remote(cfg.out):
        storage.makedirs(cfg.out)
        return _prepare_locked(cfg, _json_roundtrip(identity), header)  # no run lock on a URL: see storage.py
    cfg.out.mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.out):
        return _prepare_locked(cfg, _json_roundtrip(identity), header)


def _prepare_locked(cfg: GenerateConfig, identity: dict, header: dict) -> list[Path | str]:
    run_dir, remote = cfg.out, storage.is_remote(cfg.out)
    existing = read_dataset_json(run_dir)
    if cfg.overwrite:
        if remote:
            storage.clear_run(run_dir, DATASET_JSON)
        else:
            _clear_run_files(run_dir)
        existing = None
    elif existing is None and _has_tars(run_dir):
        raise UsageError(
            f"{run_dir} holds .tar files but no {DATASET_JSON}: it is not a synthgen run folder. "
            "Choose another --out, or pass --overwrite to delete those shards"
        )
    elif existing is not None and existing.get("identity") != identity:
        old = existing.get("identity", {})
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        details = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff[:8])
        raise UsageError(
            f"{run_dir} was generated with a different configuration ({details}); resuming would mix two "
            f"datasets. Use the original options, another --out, or --overwrite to start afresh"
        )
    removed = storage.remove_uncommitted(run_dir, cfg.shards) if remote else remove_uncommitted(run_dir)
    if existing is None:
        doc = {"format": RUN_FORMAT, "identity": identity, **_json_roundtrip(header), "complete": False}
        _write_dataset_json(run_dir, doc)
    return removed


def _has_tars(run_dir: Path | str) -> bool:
    if storage.is_remote(run_dir):
        return any(name.endswith(".tar") for name in storage.list_files(run_dir))
    return any(run_dir.glob("*.tar"))


def _write_dataset_json(run_dir: Path | str, doc: dict) -> None:
    if storage.is_remote(run_dir):
        storage.write_bytes(run_dir, DATASET_JSON, json_bytes(doc))
    else:
        write_json_atomic(run_dir / DATASET_JSON, doc)


def _clear_run_files(run_dir: Path) -> None:
    held = held_shards(run_dir)
    if held:
        raise UsageError(
            f"--overwrite would delete shards another generate process is writing in {run_dir} (shard "
            f"{held[0]} is held by {lock_holder(run_dir, held[0])}); stop it first, or drop --overwrite to "
            "join it"
        )
    # Lock files stay: held_shards already removed the stale ones, and deleting a held one would let a
    # second writer in.
    for pattern in ("*.tar", "*.stats.json", "*.tmp", DATASET_JSON):
        for path in run_dir.glob(pattern):
            path.unlink()


def finalize_run(cfg: GenerateConfig, class_names: list[str]) -> dict:
    """Aggregate every stats file into dataset.json; returns the updated document.

    Under the run lock, so of two processes finishing together the later one reads every shard the
    earlier one committed, and the last dataset.json written is complete when the run is. A URL folder
    has no lock: each run aggregates what is committed when it ends (see storage.py).
    """
    if storage.is_remote(cfg.out):
        return _finalize_locked(cfg, class_names)
    with run_lock(cfg.out):
        return _finalize_locked(cfg, class_names)


def _finalize_locked(cfg: GenerateConfig, class_names: list[str]) -> dict:
    run_dir = cfg.out
    doc = read_dataset_json(run_dir) or {}
    shards, per_class = {}, Counter()
    totals = Counter()
    summed = ("target", "candidates", "rejected", "nonfinite", "retried", "surplus", "errors", "oom_backoffs")
    for k, stats in _committed_stats(run_dir, cfg.num_shards):
        shards[str(k)] = stats
        for label, count in stats.get("per_class", {}).items():
            per_class[class_names[int(label)]] += count
        for key in ("count", *summed):
            totals[key] += stats.get(key, 0)
    doc.update(
        shards=shards,
        num_shards=cfg.num_shards,
        class_names=class_names,
        per_class_counts={name: per_class.get(name, 0) for name in class_names},
        totals={"samples": totals["count"], **{k: totals[k] for k in summed}, "shards_done": len(shards)},
        complete=len(shards) == cfg.num_shards and totals["count"] == cfg.n,
    )
    _write_dataset_json(run_dir, doc)
    return doc


def _committed_stats(run_dir: Path | str, num_shards: int):
    """(shard, stats) of the committed shards, in order."""
    if storage.is_remote(run_dir):
        yield from sorted(storage.committed_stats(run_dir, (0, num_shards)).items())
        return
    for k in range(num_shards):
        stats = read_stats(run_dir, k) if shard_path(run_dir, k).exists() else None
        if stats is not None:
            yield k, stats


def remembered_batch_sizes(cfg: GenerateConfig, device: str) -> dict[str, int]:
    """stage -> the smallest working chunk size a committed shard of this run ended at below its configured
    size, among shards written on `device` with the configured sizes of `cfg`: what an out-of-memory
    backoff learned, for a resumed process to start from. A changed --batch or device forgets it."""
    configured = cfg.batch_sizes
    out: dict[str, int] = {}
    for _, stats in _committed_stats(cfg.out, cfg.num_shards):
        if stats.get("device") != device:
            continue
        was = stats.get("configured_batch_sizes", {})
        for stage, size in stats.get("batch_sizes", {}).items():
            if was.get(stage) == configured.of(stage) and size < configured.of(stage):
                out[stage] = min(size, out.get(stage, size))
    return out


def pending_shards(cfg: GenerateConfig) -> list[int]:
    """Shards in the requested range not yet committed (the resume rule: tar and stats file both present)."""
    start, stop = cfg.shards or (0, cfg.num_shards)
    if start >= cfg.num_shards:
        raise UsageError(f"--shards {start}:{stop} starts past the last shard ({cfg.num_shards - 1})")
    done = storage.completed_shards(cfg.out) if storage.is_remote(cfg.out) else completed_shards(cfg.out)
    return [k for k in range(start, min(stop, cfg.num_shards)) if k not in done]
