"""`synthgen verify RUN --repair`: regenerate exactly the shards verify found damaged.

Every sample is a pure function of the run's identity and its id, so a damaged shard generated again is
byte-identical to the one that was committed (same device kind and JPEG encoder). The damaged shards'
files are removed first, which makes them pending; then the run's own recorded configuration generates
those shards and no others.
"""

from __future__ import annotations

import json

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pipeline import RunSummary, run_generate
from synthgen.runfolder import DATASET_JSON
from synthgen.runstate import open_run_folder
from synthgen.shards import index_name, stats_name, tar_name
from synthgen.verify import VerifyReport, verify_run


def repair_run(run_dir, progress: bool = True) -> tuple[VerifyReport, RunSummary | None, VerifyReport]:
    """(report before, the generate summary or None when nothing was damaged, report after)."""
    before = verify_run(run_dir)
    if not before.damaged:
        return before, None, before
    folder = open_run_folder(run_dir)
    raw = folder.read(DATASET_JSON)
    try:
        config = json.loads(raw)["config"]
    except (TypeError, ValueError, KeyError) as exc:
        raise UsageError(f"{folder.where(DATASET_JSON)} has no readable config to regenerate from ({exc}); "
                         "rerun the original generate command with --overwrite") from exc
    cfg = GenerateConfig.from_dict(config, out=folder.location, overwrite=False, progress=progress, shards=None)
    damaged = sorted(k for k in before.damaged if k < cfg.num_shards)
    with folder.folder_lock():
        folder.delete([name for k in damaged for name in (stats_name(k), tar_name(k), index_name(k))])
    summary = run_generate(cfg, only=damaged)
    return before, summary, verify_run(run_dir)
