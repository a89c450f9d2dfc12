"""One shard, start to commit: candidates from the device stage -> the filter's decisions per group of ids
-> encode -> write -> commit; and the loop that claims and runs a list of shards.

A shard is the unit of work: it needs only the runtime and the run folder. Its candidates come from its
own id range [shard * budget, (shard + 1) * budget) in order, and decisions are made per fixed group of
ids, so its bytes depend on neither batch size, look-ahead nor encoder timing.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthgen.encode import Chosen, OrderedWriter, encode_workers
from synthgen.filtering import accept_group
from synthgen.overlap import open_stream
from synthgen.render import RenderedBatch
from synthgen.runfolder import RunFolder
from synthgen.runstate import remembered_batch_sizes
from synthgen.runtime import Runtime, device_name
from synthgen.shards import SampleRecord, ShardWriter, sample_key, stats_path, write_stats
from synthgen.signals import signals_deferred
from synthgen.stats import COUNTERS, ShardStats


@dataclass
class _Candidates:
    """Generated candidates waiting for their group's decision, in id order. A batch is released once all
    of its rows are taken, so only undecided rows hold memory."""

    rows: deque = field(default_factory=deque)  # (RenderedBatch, row)

    def add(self, batch: RenderedBatch) -> None:
        self.rows.extend((batch, r) for r in range(len(batch.scores)))

    def take(self, n: int) -> list[tuple[RenderedBatch, int]]:
        return [self.rows.popleft() for _ in range(min(n, len(self.rows)))]


def sample_meta(rt: Runtime, batch: RenderedBatch, row: int, key: str) -> dict:
    """The `<key>.json` of a written sample: where it came from, enough to regenerate it alone."""
    p, bank, cfg = batch.plan, rt.bank, rt.cfg
    label = int(p.labels[row])
    anchors = [int(p.anchor_a[row])] + ([int(p.anchor_b[row])] if p.anchor_b[row] != p.anchor_a[row] else [])
    score = float(batch.scores[row])
    return {
        "key": key, "sample_id": int(p.sample_ids[row]), "seed": int(p.seeds[row]),
        "label": label, "class_name": bank.class_names[label],
        "anchors": anchors, "anchor_keys": [bank.keys[a] for a in anchors],
        "mode": cfg.mode, "lambda": cfg.lam, "mix": float(p.mix[row]),
        "score": None if np.isnan(score) else round(score, 6),
        # "cfg": the guidance scale, under the key shards have always carried.
        "sampler": cfg.sampler, "steps": cfg.steps, "cfg": cfg.guidance, "pack": rt.pack.hash,
    }


def _record(rt: Runtime, chosen: Chosen, blob: bytes) -> SampleRecord:
    batch, row = chosen.batch, chosen.row
    cond = batch.cond[row].astype(np.float16) if rt.cfg.save_cond else None
    return SampleRecord(chosen.key, blob, rt.cfg.format, int(batch.plan.labels[row]),
                        sample_meta(rt, batch, row, chosen.key), cond)


def restore_batch_sizes(rt: Runtime, folder: RunFolder) -> None:
    """Start each stage at the size earlier processes on this run folder backed off to on this device.

    Called on the runtime's first shard, once the run folder is known to hold this run (a resumed run
    would otherwise meet the same out-of-memory error in its first chunk again).
    """
    for stage, size in remembered_batch_sizes(folder, rt.cfg, device_name(rt.device)).items():
        rt.batches[stage].resume_at(size)
    rt.restored = True


def generate_shard(rt: Runtime, folder: RunFolder, shard: int, encoders: ThreadPoolExecutor | None = None,
                   on_images=None) -> ShardStats | None:
    """Generate, filter and commit shard `shard`; returns its stats (also written as the done marker).

    `encoders`: a thread pool to encode on (one is made when None); `on_images(accepted, decided)` is
    called after each decision. None when the folder already had the shard committed at publish time (a
    URL folder, written meanwhile by another job: nothing is uploaded then).
    """
    if not rt.restored:
        restore_batch_sizes(rt, folder)
    with folder.staging() as run_dir:
        stats = _write_shard(rt, shard, run_dir, encoders, on_images)
        if not folder.publish(run_dir, shard):
            return None
    return stats


def _write_shard(rt: Runtime, shard: int, run_dir: Path, encoders, on_images) -> ShardStats:
    cfg, fcfg = rt.cfg, rt.cfg.filter_config
    target, budget = cfg.shard_target(shard), cfg.candidate_budget
    group = fcfg.decision_group
    stats_path(run_dir, shard).unlink(missing_ok=True)  # regenerating: the old marker no longer holds
    counts, per_class = Counter(), Counter()
    pending, received, start, backoffs = _Candidates(), 0, time.perf_counter(), rt.oom_backoffs
    grouped = fcfg.keep_top is not None  # keep-top ranks a whole group; other rules judge one at a time
    workers = encode_workers(cfg.encode_workers)
    with ExitStack() as stack:  # on any error, in reverse: stop the device, drop the tmp file, stop the pool
        pool = encoders or stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="encode"))
        writer = stack.enter_context(ShardWriter(run_dir, shard))
        stream = open_stream(rt, shard * budget, budget)
        stack.callback(stream.close)
        out = OrderedWriter(writer, pool, workers, cfg.format, cfg.quality, rt.image_encoder,
                            lambda chosen, blob: _record(rt, chosen, blob))
        while counts["count"] < target and (received < budget or pending.rows):
            ready = len(pending.rows) >= group if grouped else bool(pending.rows)
            if received < budget and not ready:
                need = budget - received if fcfg.active else target - counts["count"]
                stream.want(received + need)
                batch = stream.next()
                pending.add(batch)
                received += len(batch.scores)
                continue
            # A full group, every pending candidate (independent rules), or the tail of the budget.
            decided = pending.take(group if grouped else len(pending.rows))
            keep = decide(decided, fcfg)
            room = target - counts["count"]
            if not grouped and keep.sum() > room:
                # Candidates past the one that filled the shard were computed but never judged.
                cut = int(np.flatnonzero(keep)[room - 1]) + 1
                counts["unused"] += len(decided) - cut
                decided, keep = decided[:cut], keep[:cut]
            counts["candidates"] += len(decided)
            counts["nonfinite"] += sum(not b.valid[r] for b, r in decided)
            counts["retried"] += sum(bool(b.retried[r]) for b, r in decided)
            counts["rejected"] += int((~keep).sum())
            chosen = [d for d, k in zip(decided, keep) if k]
            counts["surplus"] += max(0, len(chosen) - room)
            items = [Chosen(sample_key(shard, counts["count"] + i), b, r) for i, (b, r) in enumerate(chosen[:room])]
            out.submit(items)
            counts["count"] += len(items)
            per_class.update(int(c.batch.plan.labels[c.row]) for c in items)
            if on_images is not None:
                on_images(len(items), len(decided))
        counts["unused"] += len(pending.rows)
        stream.close()  # look-ahead past the shard's last decision is not needed: free the device now
        out.drain()
        with signals_deferred():  # the tar and its done marker land together, or neither does
            info = writer.commit()
            stats = ShardStats(
                shard=shard, target=target, **{k: int(counts[k]) for k in COUNTERS},
                exhausted=counts["count"] < target, first_candidate_id=shard * budget,
                per_class={str(k): v for k, v in sorted(per_class.items())},
                sha256=info["sha256"], bytes=info["bytes"], seconds=round(time.perf_counter() - start, 3),
                image_encoder=rt.image_encoder, oom_backoffs=rt.oom_backoffs - backoffs,
                batch_sizes={stage: b.size for stage, b in rt.batches.items()},
                configured_batch_sizes={stage: rt.sizes.of(stage) for stage in rt.batches},
                device=device_name(rt.device),
            )
            write_stats(run_dir, stats)
    return stats


def decide(decided: list[tuple[RenderedBatch, int]], fcfg) -> np.ndarray:
    """(n,) bool: kept candidates. Without a filter rule only non-finite images are dropped."""
    valid = np.array([b.valid[r] for b, r in decided], dtype=bool)
    if not fcfg.active:
        return valid
    scores = np.array([b.scores[r] for b, r in decided], dtype=np.float32)
    labels = np.array([b.plan.labels[r] for b, r in decided], dtype=np.int64)
    return accept_group(np.nan_to_num(scores, nan=-2.0), labels, valid, fcfg)


def run_claimed_shard(rt: Runtime, folder: RunFolder, shard: int, encoders=None, on_images=None,
                      block: bool = False) -> ShardStats | None:
    """Claim `shard`, then generate it unless it is committed by now; None when it is not ours to write.

    The claim keeps two processes off one shard (a URL folder has none: jobs own disjoint ranges, and
    publish re-checks); checking the commit after claiming keeps a shard another process just committed
    from being rewritten.
    """
    claim = folder.claim(shard, block=block)
    if claim is None:
        return None
    with claim:
        if folder.is_committed(shard):
            return None
        return generate_shard(rt, folder, shard, encoders, on_images)


def run_shards(rt: Runtime, folder: RunFolder, shards: list[int], on_images=None):
    """Generate every shard of `shards` this process can claim; yields each one's stats.

    Shards another live process holds are waited for at the end (and redone if it died meanwhile), so
    when this returns every shard of the list is committed, by this process or another.
    """
    held = []
    with ThreadPoolExecutor(encode_workers(rt.cfg.encode_workers), thread_name_prefix="encode") as encoders:
        for shard in shards:
            stats = run_claimed_shard(rt, folder, shard, encoders, on_images)
            if stats is not None:
                yield stats
            elif not folder.is_committed(shard):
                held.append(shard)
        for shard in held:
            stats = run_claimed_shard(rt, folder, shard, encoders, on_images, block=True)
            if stats is not None:
                yield stats
