"""The run folder: `dataset.json` (identity + aggregated counts) beside the shards and their stats files.

Stats files are the truth (STYLE 11): `dataset.json` is rebuilt from them after every run, so it is
right whichever process or machine wrote which shard.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.shards import completed_shards, read_stats, remove_stray_tmp, shard_path, write_json_atomic

RUN_FORMAT = "synthgen-run/1"
DATASET_JSON = "dataset.json"


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


def read_dataset_json(run_dir: Path) -> dict | None:
    path = run_dir / DATASET_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); rerun with --overwrite to start this folder afresh") from e


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj, default=str))


def prepare_run_dir(cfg: GenerateConfig, identity: dict, header: dict) -> list[Path]:
    """Create or reopen `cfg.out` for this identity; returns the stray temporary files it removed.

    A folder written under a different identity is refused (resuming it would mix two datasets), unless
    --overwrite, which deletes only synthgen's own files there.
    """
    run_dir = cfg.out
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = read_dataset_json(run_dir)
    identity = _json_roundtrip(identity)
    if cfg.overwrite:
        _clear_run_files(run_dir)
        existing = None
    elif existing is None and any(run_dir.glob("*.tar")):
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
    removed = remove_stray_tmp(run_dir)
    if existing is None:
        doc = {"format": RUN_FORMAT, "identity": identity, **_json_roundtrip(header), "complete": False}
        write_json_atomic(run_dir / DATASET_JSON, doc)
    return removed


def _clear_run_files(run_dir: Path) -> None:
    for pattern in ("*.tar", "*.stats.json", "*.tmp", DATASET_JSON):
        for path in run_dir.glob(pattern):
            path.unlink()


def finalize_run(cfg: GenerateConfig, class_names: list[str]) -> dict:
    """Aggregate every stats file into dataset.json; returns the updated document."""
    run_dir = cfg.out
    doc = read_dataset_json(run_dir) or {}
    shards, per_class = {}, Counter()
    totals = Counter()
    for k in range(cfg.num_shards):
        stats = read_stats(run_dir, k) if shard_path(run_dir, k).exists() else None
        if stats is None:
            continue
        shards[str(k)] = stats
        for label, count in stats.get("per_class", {}).items():
            per_class[class_names[int(label)]] += count
        for key in ("count", "target", "candidates", "rejected", "nonfinite", "surplus", "errors"):
            totals[key] += stats.get(key, 0)
    doc.update(
        shards=shards,
        num_shards=cfg.num_shards,
        class_names=class_names,
        per_class_counts={name: per_class.get(name, 0) for name in class_names},
        totals={"samples": totals["count"], **{k: totals[k] for k in
                ("target", "candidates", "rejected", "nonfinite", "surplus", "errors")},
                "shards_done": len(shards)},
        complete=len(shards) == cfg.num_shards and totals["count"] == cfg.n,
    )
    write_json_atomic(run_dir / DATASET_JSON, doc)
    return doc


def pending_shards(cfg: GenerateConfig) -> list[int]:
    """Shards in the requested range not yet committed (the resume rule: tar and stats file both present)."""
    start, stop = cfg.shards or (0, cfg.num_shards)
    if start >= cfg.num_shards:
        raise UsageError(f"--shards {start}:{stop} starts past the last shard ({cfg.num_shards - 1})")
    done = completed_shards(cfg.out)
    return [k for k in range(start, min(stop, cfg.num_shards)) if k not in done]
