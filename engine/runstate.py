"""A run's state in its folder: open the folder (local or URL, chosen here once), check that it belongs to
this run, clean what was never committed, list what is pending, and rebuild `dataset.json`.

Stats files are the truth: `dataset.json` is rebuilt from them after every run, so it is right whichever
process or machine wrote which shard. All of this runs before any model loads or after the last shard.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.indexes import WIDS_INDEX, dali_index, tar_members, wids_index
from synthgen.runfolder import DATASET_JSON, RunFolder, is_remote, normalize_out
from synthgen.shards import index_name, stats_name, tar_name
from synthgen.stats import RunDoc, json_bytes


def open_run_folder(out, staging: Path | None = None) -> RunFolder:
    """The run folder at `out` (a path or a URL) as the right kind; `staging`: where a URL folder's shards
    are written before upload (None: a temporary folder)."""
    out = normalize_out(out)
    if is_remote(out):
        from synthgen.urlfolder import UrlFolder

        return UrlFolder(out, staging)
    from synthgen.localfolder import LocalFolder

    return LocalFolder(out)


def run_folder(cfg: GenerateConfig) -> RunFolder:
    return open_run_folder(cfg.out, cfg.staging)


def versions() -> dict:
    """The versions a run records, read from the installed distributions' metadata: importing diffusers
    only for its version string cost 3 s of a small run's start-up."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    import synthgen

    return {
        "synthgen": synthgen.__version__, **{d: of(d) for d in ("torch", "diffusers", "timm", "numpy", "webdataset")},
        "python": platform.python_version(),
    }


def read_dataset_json(folder: RunFolder) -> dict | None:
    raw = folder.read(DATASET_JSON)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{folder.where(DATASET_JSON)} is not valid JSON ({e}); rerun with --overwrite to "
                         "start this folder afresh") from e
    if not isinstance(doc, dict):
        raise UsageError(f"{folder.where(DATASET_JSON)} is not a JSON object; rerun with --overwrite to start "
                         "this folder afresh")
    return doc


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj, default=str))


def prepare_run(folder: RunFolder, cfg: GenerateConfig, identity: dict, header: dict) -> list:
    """Create or reopen the folder for this identity; returns the stray temporary files it removed.

    A folder written under a different identity is refused (resuming it would mix two datasets), unless
    --overwrite, which deletes only synthgen's own files there (refused while another process writes).
    Cheap, and needs no model: run it before loading any.
    """
    folder.create()
    identity = _json_roundtrip(identity)
    with folder.folder_lock():
        existing = read_dataset_json(folder)
        if cfg.overwrite:
            folder.clear()
            existing = None
        elif existing is None and any(name.endswith(".tar") for name in folder.files()):
            raise UsageError(
                f"{folder.location} holds .tar files but no {DATASET_JSON}: it is not a synthgen run folder. "
                "Choose another --out, or pass --overwrite to delete those shards"
            )
        elif existing is not None and _without_n(existing.get("identity")) != _without_n(identity):
            old = existing.get("identity", {})
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            details = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff[:8])
            raise UsageError(
                f"{folder.location} was generated with a different configuration ({details}); resuming would "
                "mix two datasets. Use the original options, another --out, or --overwrite to start afresh"
            )
        if existing is not None and existing.get("identity", {}).get("n") != cfg.n:
            _grow(folder, cfg, existing)
        removed = folder.remove_uncommitted(cfg.shards)
        if existing is None:
            doc = RunDoc.from_dict({**_json_roundtrip(header), "identity": identity})
            folder.write(DATASET_JSON, json_bytes(doc.to_dict()))
    return removed


def _without_n(identity) -> dict | None:
    return {k: v for k, v in identity.items() if k != "n"} if isinstance(identity, dict) else identity


def _grow(folder: RunFolder, cfg: GenerateConfig, existing: dict) -> None:
    """Take a finished or partial run to a larger --n: every committed shard that is full stays (a sample's
    image depends on the run's identity and its id, never on n), the old last shard, whose target grows,
    is made pending again, and dataset.json records the new n. A smaller --n is refused: its shards past
    the new end would stay in the folder, where every reader would find them."""
    old_n = existing.get("identity", {}).get("n")
    if not isinstance(old_n, int) or cfg.n < old_n:
        raise UsageError(
            f"{folder.location} holds a run of --n {old_n}; --n {cfg.n} would shrink it, and the shards past the "
            "new end would stay in the folder. Keep --n, choose another --out, or pass --overwrite"
        )
    stale = [k for k, s in folder.committed((0, cfg.num_shards)).items() if s.target != cfg.shard_target(k)]
    folder.delete([name for k in stale for name in (stats_name(k), tar_name(k), index_name(k))])
    existing["identity"]["n"] = cfg.n
    existing.setdefault("config", {})["n"] = cfg.n
    folder.write(DATASET_JSON, json_bytes(existing))


def finalize_run(folder: RunFolder, cfg: GenerateConfig, class_names: list[str]) -> dict:
    """Aggregate every committed shard's stats into dataset.json and index the committed shards for wids;
    returns the updated document.

    Under the folder lock, so of two processes finishing together the later one reads every shard the
    earlier one committed, and the last files written are complete when the run is. A URL folder has no
    lock: each run aggregates what is committed when it ends (urlfolder.py).
    """
    with folder.folder_lock():
        listing = folder.files()
        committed = folder.committed((0, cfg.num_shards), listing)
        _write_missing_indexes(folder, [k for k, s in committed.items() if s.count and index_name(k) not in listing])
        doc = RunDoc.from_dict(read_dataset_json(folder) or {"identity": {}})
        doc.class_names = class_names
        doc.aggregate(committed, cfg.num_shards, cfg.n)
        out = doc.to_dict()
        folder.write(DATASET_JSON, json_bytes(out))
        # Shards that hold no sample (a filter that accepted nothing) are left out: readers have nothing to open.
        shards = [(tar_name(k), s.count, s.bytes) for k, s in sorted(committed.items()) if s.count]
        if shards:
            folder.write(WIDS_INDEX, json_bytes(wids_index(shards, _run_name(folder))))
        else:
            folder.delete([WIDS_INDEX])
    return out


def _run_name(folder: RunFolder) -> str:
    return str(folder.location).rstrip("/").rsplit("/", 1)[-1]


def _write_missing_indexes(folder: RunFolder, shards: list[int]) -> None:
    """DALI indexes for committed shards that have none (written by a synthgen before indexes): read from
    each tar's headers."""
    if not shards:
        return
    with folder.local_copies() as local:
        for shard in shards:
            folder.write(index_name(shard), dali_index(tar_members(local(tar_name(shard)))))


def remembered_batch_sizes(folder: RunFolder, cfg: GenerateConfig, device: str) -> dict[str, int]:
    """stage -> the smallest working chunk size a committed shard of this run ended at below its configured
    size, among shards written on `device` with the configured sizes of `cfg`: what an out-of-memory
    backoff learned, for a resumed process to start from. A changed --batch or device forgets it."""
    configured = cfg.batch_sizes
    out: dict[str, int] = {}
    for stats in folder.committed((0, cfg.num_shards)).values():
        if stats.device != device:
            continue
        for stage, size in stats.batch_sizes.items():
            if stats.configured_batch_sizes.get(stage) == configured.of(stage) and size < configured.of(stage):
                out[stage] = min(size, out.get(stage, size))
    return out


def pending_shards(folder: RunFolder, cfg: GenerateConfig) -> list[int]:
    """Shards in the requested range not yet committed."""
    start, stop = cfg.shards or (0, cfg.num_shards)
    if start >= cfg.num_shards:
        raise UsageError(f"--shards {start}:{stop} starts past the last shard ({cfg.num_shards - 1})")
    done = folder.committed((start, min(stop, cfg.num_shards)))
    return [k for k in range(start, min(stop, cfg.num_shards)) if k not in done]
