"""generate, the run driver: check the run (no weights), open and claim the run folder, hand the pending
shards to an executor, rebuild dataset.json.

  plan -> condition -> sample -> decode -> filter -> encode -> write      (docs/ARCHITECTURE.md)

The stages live in their own modules: condition.py, render.py (sample, decode, score on the device),
shard_job.py (decisions and one shard's commit), encode.py, shards.py; overlap.py moves batches between
the device stage and the decisions; runtime.py loads what a process needs once; runstate.py and the
run-folder modules keep the folder. Who runs the shards is an executor: this process (LocalExecutor), or
Ray actors (distributed.py); both build from the same GenerateConfig.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from synthgen.bank import check_bank_fits_pack, load_bank
from synthgen.card import write_card
from synthgen.condition import check_guidance
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pack import pack_hash, read_pack_config
from synthgen.plan import Planner
from synthgen.runfolder import RunFolder
from synthgen.runstate import finalize_run, pending_shards, prepare_run, run_folder, versions
from synthgen.runtime import load_runtime, resolve_bank_path
from synthgen.shard_job import run_shards
from synthgen.signals import Interrupted, stop_on_signals
from synthgen.stats import ShardStats


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
    short: list[int] = field(default_factory=list)  # shards of the asked range missing or below their target

    @property
    def range_complete(self) -> bool:
        """Every shard this command was asked for (--shards, or all) is committed with its full target."""
        return not self.short

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
        earlier = [k for k in self.short if k not in self.exhausted]
        if earlier:
            out.append(f"WARNING         shard(s) {earlier[:10]} of the asked range are short or missing: committed "
                       "below their target by an earlier run, or held by another writer that has not finished")
        out.append(f"dataset         {'complete' if self.complete else 'incomplete'}; check it with "
                   f"'synthgen verify {self.run_dir}'")
        return out


def describe_run(cfg: GenerateConfig) -> tuple[dict, dict, list[str]]:
    """(identity, dataset.json header, class names), checked without loading any weights.

    Validates what `load_runtime` would (pack config, bank, bank fits pack, guidance, plan), so a bad run
    is refused before any model loads or any Ray actor starts.
    """
    config = read_pack_config(cfg.pack)
    bank = load_bank(resolve_bank_path(cfg))
    check_bank_fits_pack(bank, config, cfg.pack)
    check_guidance(cfg.guidance, config.denoiser.null_condition, cfg.null, cfg.pack)
    Planner(bank.labels, bank.class_names, cfg.plan_config)
    identity = {**cfg.identity(), "pack_hash": pack_hash(config), "bank_hash": bank.hash}
    header = {
        "config": cfg.to_dict(), "versions": versions(), "pack_hash": identity["pack_hash"],
        "bank_hash": bank.hash, "class_names": bank.class_names, "random_weights": config.random_weights,
        "image_size": config.image_size,
    }
    return identity, header, bank.class_names


# ---- Executors: who runs the pending shards ----------------------------------------------------------


def check_executor(cfg: GenerateConfig) -> None:
    """Refuse an executor that cannot run here before the run folder is touched."""
    if cfg.executor == "ray":
        from synthgen.distributed import import_ray

        import_ray()
    elif (cfg.workers or 1) > 1:
        raise UsageError(
            f"--workers {cfg.workers} needs --executor ray (pip install 'synthgen[ray]'); without Ray, start "
            "one 'synthgen generate' per worker on the same --out: shard claims split the work"
        )


class LocalExecutor:
    """Runs shards in this process with one runtime (loaded once, here)."""

    def __init__(self, cfg: GenerateConfig, folder: RunFolder) -> None:
        self.folder = folder
        self.runtime = load_runtime(cfg)

    def run(self, shards: list[int], on_images):
        yield from run_shards(self.runtime, self.folder, shards, on_images)

    def close(self) -> None:
        pass


def make_executor(cfg: GenerateConfig, folder: RunFolder):
    """The executor for `cfg.executor`; both share `run(shards, on_images) -> iterator of ShardStats` and
    `close()`."""
    if cfg.executor == "ray":
        from synthgen.distributed import RayExecutor

        return RayExecutor(cfg)
    return LocalExecutor(cfg, folder)


def run_generate(cfg: GenerateConfig, only: list[int] | None = None) -> RunSummary:
    """Resume or start the run described by `cfg`: generate every pending shard in range, then aggregate.

    The folder's identity is checked (and its leftovers cleaned) before any model loads, so a wrong --out
    costs nothing. `only`: generate no pending shard outside this list (verify --repair). SIGINT/SIGTERM
    raise `Interrupted` once the open shard is abandoned and dataset.json is updated.
    """
    with stop_on_signals():
        identity, header, class_names = describe_run(cfg)
        check_executor(cfg)
        folder = run_folder(cfg)
        removed = prepare_run(folder, cfg, identity, header)
        todo = [k for k in pending_shards(folder, cfg) if only is None or k in only]
        executor = make_executor(cfg, folder)
        try:
            results, t0 = _execute(cfg, folder, executor, todo, class_names)
        finally:
            executor.close()
        doc = _finish(folder, cfg, class_names)
    start, stop = cfg.shards or (0, cfg.num_shards)
    return RunSummary(
        run_dir=cfg.out,
        shards_written=[r.shard for r in results],
        shards_skipped=len(range(start, min(stop, cfg.num_shards))) - len(results),
        images=sum(r.count for r in results),
        candidates=sum(r.candidates for r in results),
        rejected=sum(r.rejected for r in results),
        nonfinite=sum(r.nonfinite for r in results),
        exhausted=[r.shard for r in results if r.exhausted],
        retried=sum(r.retried for r in results),
        oom_backoffs=sum(r.oom_backoffs for r in results),
        seconds=time.perf_counter() - t0,
        removed_tmp=removed,
        complete=doc["complete"],
        short=_short_shards(doc, cfg),
    )


def _short_shards(doc: dict, cfg: GenerateConfig) -> list[int]:
    start, stop = cfg.shards or (0, cfg.num_shards)
    done = doc.get("shards") or {}
    return [k for k in range(start, min(stop, cfg.num_shards))
            if (done.get(str(k)) or {}).get("count", -1) < cfg.shard_target(k)]


def _finish(folder: RunFolder, cfg: GenerateConfig, class_names: list[str]) -> dict:
    """dataset.json and the wids index from the committed stats, then the dataset card, last."""
    doc = finalize_run(folder, cfg, class_names)
    write_card(folder, doc, read_pack_config(cfg.pack))
    return doc


def _execute(cfg: GenerateConfig, folder: RunFolder, executor, todo: list[int],
             class_names: list[str]) -> tuple[list[ShardStats], float]:
    """Run `todo` through the executor with a progress bar; on an interrupt, aggregate what is committed."""
    from tqdm import tqdm

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
        _finish(folder, cfg, class_names)
        raise
    finally:
        bar.close()
    return results, t0
