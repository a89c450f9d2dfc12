"""generate: embedding bank -> planned conditions -> denoiser x K -> decode -> filter -> shards.

Data flows one way:
  plan(ids) -> conditions + noise (pure functions of run seed and id)
  -> sample() with CFG on the representation -> VAE decode -> re-encode and score (on the device)
  -> one transfer per batch -> group decisions in id order -> encode images -> ShardWriter
A shard is the unit of work: `generate_shard` needs only the engine, the config and the shard index.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from synthgen.bank import Bank, check_bank_fits_pack, load_bank
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.filtering import accept_group, cosine_scores
from synthgen.kernels.dispatch import guided_step
from synthgen.models.denoiser import cond_uncond
from synthgen.noise import STREAM_INIT, STREAM_STEP0, gaussian
from synthgen.pack import Pack, load_pack
from synthgen.plan import Planner, SamplePlan, conditions
from synthgen.samplers import SamplerPlan, make_plan, sample
from synthgen.shards import SampleRecord, ShardWriter, encode_image, sample_key, shard_path, stats_path, write_stats

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_bank_path(cfg: GenerateConfig) -> Path:
    if cfg.bank is not None:
        return cfg.bank
    if (cfg.pack / "bank" / "bank.json").is_file():
        return cfg.pack / "bank"
    raise UsageError(
        f"no --bank given and pack {cfg.pack} ships no bank/ folder; build one with "
        f"'synthgen embed --images DIR --pack {cfg.pack} --out BANK' and pass --bank BANK"
    )


# ---- Engine: everything loaded once per process ---------------------------------------------------


@dataclass
class Engine:
    cfg: GenerateConfig
    pack: Pack
    bank: Bank
    planner: Planner
    sampler: SamplerPlan
    device: torch.device
    dtype: torch.dtype
    embeddings: torch.Tensor  # (N, D) bank on the device
    null: torch.Tensor  # (D,) on the device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.pack.config.denoiser.sample_shape


def load_engine(cfg: GenerateConfig) -> Engine:
    device = resolve_device(cfg.device)
    dtype = TORCH_DTYPES[cfg.dtype]
    bank = load_bank(resolve_bank_path(cfg))
    pack = load_pack(cfg.pack, device=device, dtype=dtype)
    if cfg.engine is not None or cfg.backend != "eager":
        from synthgen.engines import attach_engines  # swaps pack.denoiser/vae/encoder for engine-backed callables

        attach_engines(pack, device, cfg.engine, cfg.backend, cfg.dtype, cfg.batch, cfg.cfg)
    check_bank_fits_pack(bank, pack.config, cfg.pack)
    planner = Planner(bank.labels, bank.class_names, cfg.plan_config)
    sampler = make_plan(cfg.sampler, pack.config.schedule, cfg.steps, device=device)
    return Engine(
        cfg, pack, bank, planner, sampler, device, dtype,
        bank.embeddings.to(device), pack.null_condition.to(device),
    )


def run_identity(engine: Engine) -> dict:
    return {**engine.cfg.identity(), "pack_hash": engine.pack.hash, "bank_hash": engine.bank.hash}


# ---- One batch on the device ----------------------------------------------------------------------


@dataclass
class BatchResult:
    """Host-side outputs of one batch; arrays have length B."""

    plan: SamplePlan
    images: np.ndarray  # (B, H, W, 3) uint8
    scores: np.ndarray  # (B,) float32 cos(enc(x_hat), c); nan for non-finite images
    valid: np.ndarray  # (B,) bool, False when the image had NaN/Inf
    cond: np.ndarray  # (B, D) float32 conditioning used
    pixels: torch.Tensor | None = None  # (B, 3, H, W) float in [0, 1] when asked for (tests)


@torch.inference_mode()
def generate_batch(engine: Engine, sample_ids: np.ndarray, keep_pixels: bool = False) -> BatchResult:
    plan = engine.planner.plan(sample_ids)
    seeds = torch.from_numpy(plan.seeds).to(engine.device)
    cond = conditions(engine.embeddings, plan, engine.cfg.lam, seeds)  # (B, D) float32
    cond_in, null_in = cond.to(engine.dtype), engine.null.to(engine.dtype)
    shape = engine.sample_shape
    denoiser, cfg_scale, dtype = engine.pack.denoiser, engine.cfg.cfg, engine.dtype

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The sampler state stays float32; only the network runs in the pack dtype.
        out_cond, out_uncond = cond_uncond(denoiser, x.to(dtype), t, cond_in, null_in, cfg_scale)
        return out_cond.float(), None if out_uncond is None else out_uncond.float()

    def step(plan, k, x, outputs, prev_x0, noise):
        # Guidance and the sampler update as one elementwise pass (a Triton kernel on CUDA).
        return guided_step(plan, k, x, outputs[0], outputs[1], cfg_scale, prev_x0, noise)

    def noise_fn(k: int) -> torch.Tensor:
        return gaussian(seeds, STREAM_STEP0 + k, shape)

    x0 = sample(engine.sampler, model_fn, gaussian(seeds, STREAM_INIT, shape), noise_fn, step=step)
    images = engine.pack.vae(x0.to(dtype)).float() if engine.pack.vae is not None else x0
    valid = torch.isfinite(images).flatten(1).all(dim=1)
    pixels = ((images.nan_to_num(0.0) + 1) / 2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    scores = cosine_scores(engine.pack.encoder(pixels.to(dtype)), cond)
    scores = torch.where(valid, scores, torch.full_like(scores, float("nan")))
    as_uint8 = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return BatchResult(
        plan=plan,
        images=as_uint8.cpu().numpy(),
        scores=scores.cpu().numpy(),
        valid=valid.cpu().numpy(),
        cond=cond.cpu().numpy(),
        pixels=pixels.cpu() if keep_pixels else None,
    )


# ---- One shard -------------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Generated candidates waiting for their group's decision, in id order."""

    batches: list[BatchResult] = field(default_factory=list)
    rows: list[tuple[int, int]] = field(default_factory=list)  # (batch index, row)

    def add(self, batch: BatchResult) -> None:
        self.batches.append(batch)
        self.rows.extend((len(self.batches) - 1, r) for r in range(len(batch.scores)))

    def take(self, n: int) -> list[tuple[BatchResult, int]]:
        taken, self.rows = self.rows[:n], self.rows[n:]
        return [(self.batches[b], r) for b, r in taken]


def _meta(engine: Engine, batch: BatchResult, row: int, key: str) -> dict:
    p, bank, cfg = batch.plan, engine.bank, engine.cfg
    label = int(p.labels[row])
    anchors = [int(p.anchor_a[row])] + ([int(p.anchor_b[row])] if p.anchor_b[row] != p.anchor_a[row] else [])
    score = float(batch.scores[row])
    return {
        "key": key, "sample_id": int(p.sample_ids[row]), "seed": int(p.seeds[row]),
        "label": label, "class_name": bank.class_names[label],
        "anchors": anchors, "anchor_keys": [bank.keys[a] for a in anchors],
        "mode": cfg.mode, "lambda": cfg.lam, "mix": float(p.mix[row]),
        "score": None if np.isnan(score) else round(score, 6),
        "sampler": cfg.sampler, "steps": cfg.steps, "cfg": cfg.cfg, "pack": engine.pack.hash,
    }


def generate_shard(engine: Engine, shard: int, encoders: ThreadPoolExecutor | None = None, on_images=None) -> dict:
    """Generate, filter and commit shard `shard`; returns its stats (also written as the done marker).

    Candidates come from the shard's own id range [shard * budget, (shard + 1) * budget) in order;
    decisions are made per fixed group of ids, so the shard's content does not depend on batch size.
    """
    cfg, fcfg = engine.cfg, engine.cfg.filter_config
    run_dir, target, budget = cfg.out, cfg.shard_target(shard), cfg.candidate_budget
    base, group = shard * budget, fcfg.decision_group
    stats_path(run_dir, shard).unlink(missing_ok=True)  # regenerating: the old marker no longer holds
    counts, per_class = Counter(), Counter()
    pending, drawn, start = _Candidates(), 0, time.perf_counter()
    grouped = fcfg.keep_top is not None  # keep-top ranks a whole group; other rules judge one at a time
    with ShardWriter(run_dir, shard) as writer:
        while counts["count"] < target and (drawn < budget or pending.rows):
            ready = len(pending.rows) >= group if grouped else bool(pending.rows)
            if drawn < budget and not ready:
                need = budget - drawn if fcfg.active else target - counts["count"]
                ids = base + drawn + np.arange(min(cfg.batch, need, budget - drawn), dtype=np.int64)
                pending.add(generate_batch(engine, ids))
                drawn += len(ids)
                continue
            # A full group, every pending candidate (independent rules), or the tail of the budget.
            decided = pending.take(group if grouped else len(pending.rows))
            keep = _decide(decided, fcfg)
            room = target - counts["count"]
            if not grouped and keep.sum() > room:
                # Candidates past the one that filled the shard were computed but never judged.
                cut = int(np.flatnonzero(keep)[room - 1]) + 1
                counts["unused"] += len(decided) - cut
                decided, keep = decided[:cut], keep[:cut]
            counts["candidates"] += len(decided)
            counts["nonfinite"] += sum(not b.valid[r] for b, r in decided)
            counts["rejected"] += int((~keep).sum())
            chosen = [d for d, k in zip(decided, keep) if k]
            counts["surplus"] += max(0, len(chosen) - room)
            _write(engine, writer, shard, chosen[:room], counts, per_class, encoders)
            if on_images is not None:
                on_images(min(len(chosen), room), len(decided))
        counts["unused"] += len(pending.rows)
        info = writer.commit()
    stats = {
        "shard": shard, "target": target, **{k: int(counts[k]) for k in
                                              ("count", "candidates", "rejected", "nonfinite", "surplus", "unused")},
        "exhausted": counts["count"] < target, "first_candidate_id": base,
        "per_class": {str(k): v for k, v in sorted(per_class.items())},
        "sha256": info["sha256"], "bytes": info["bytes"], "seconds": round(time.perf_counter() - start, 3),
    }
    write_stats(run_dir, shard, stats)
    return stats


def _decide(decided: list[tuple[BatchResult, int]], fcfg) -> np.ndarray:
    """(n,) bool: kept candidates. Without a filter rule only non-finite images are dropped."""
    valid = np.array([b.valid[r] for b, r in decided], dtype=bool)
    if not fcfg.active:
        return valid
    scores = np.array([b.scores[r] for b, r in decided], dtype=np.float32)
    labels = np.array([b.plan.labels[r] for b, r in decided], dtype=np.int64)
    return accept_group(np.nan_to_num(scores, nan=-2.0), labels, valid, fcfg)


def _write(engine, writer, shard, chosen, counts, per_class, encoders) -> None:
    cfg = engine.cfg
    encode = lambda item: encode_image(item[0].images[item[1]], cfg.format, cfg.quality)  # noqa: E731
    blobs = list(encoders.map(encode, chosen)) if encoders is not None else [encode(c) for c in chosen]
    for (batch, row), blob in zip(chosen, blobs):
        key = sample_key(shard, counts["count"])
        label = int(batch.plan.labels[row])
        cond = batch.cond[row].astype(np.float16) if cfg.save_cond else None
        writer.add(SampleRecord(key, blob, cfg.format, label, _meta(engine, batch, row, key), cond))
        counts["count"] += 1
        per_class[label] += 1


# ---- A run ------------------------------------------------------------------------------------------


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
        if self.removed_tmp:
            out.append(f"cleaned         {len(self.removed_tmp)} stray temporary file(s) from an interrupted run")
        if self.exhausted:
            out.append(
                f"WARNING         shard(s) {self.exhausted[:10]} ran out of candidates before reaching their "
                "target: lower --min-score / raise --keep-top, or raise --max-oversample"
            )
        out.append(f"dataset         {'complete' if self.complete else 'incomplete'}; check it with "
                   f"'synthgen verify {self.run_dir}'")
        return out


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
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def describe_run(cfg: GenerateConfig) -> tuple[dict, dict, list[str]]:
    """(identity, dataset.json header, class names), checked without loading any weights.

    Validates what `load_engine` would (pack config, bank, bank fits pack, plan), so a Ray driver
    refuses a bad run before it starts actors.
    """
    from synthgen.pack import pack_hash, read_pack_config
    from synthgen.runfolder import versions

    config = read_pack_config(cfg.pack)
    bank = load_bank(resolve_bank_path(cfg))
    check_bank_fits_pack(bank, config, cfg.pack)
    Planner(bank.labels, bank.class_names, cfg.plan_config)
    identity = {**cfg.identity(), "pack_hash": pack_hash(config), "bank_hash": bank.hash}
    header = {
        "config": cfg.to_dict(), "versions": versions(), "pack_hash": identity["pack_hash"],
        "bank_hash": bank.hash, "class_names": bank.class_names, "random_weights": config.random_weights,
        "image_size": config.image_size,
    }
    return identity, header, bank.class_names


# ---- Executors: who runs the pending shards ----------------------------------------------------------


def run_claimed_shard(engine: Engine, shard: int, encoders=None, on_images=None, block: bool = False) -> dict | None:
    """Claim `shard`, then generate it unless it is committed by now; None when it is not ours to write.

    The claim (runfolder.claim_shard) keeps two processes off one shard; checking for the stats file
    after claiming keeps a shard another process just committed from being rewritten.
    """
    from synthgen.runfolder import claim_shard

    claim = claim_shard(engine.cfg.out, shard, block=block)
    if claim is None:
        return None
    with claim:
        if is_committed(engine.cfg.out, shard):
            return None
        return generate_shard(engine, shard, encoders, on_images)


def is_committed(run_dir: Path, shard: int) -> bool:
    return stats_path(run_dir, shard).is_file() and shard_path(run_dir, shard).is_file()


def run_shards(engine: Engine, shards: list[int], on_images=None):
    """Generate every shard of `shards` this process can claim; yields each one's stats.

    Shards another live process holds are waited for at the end (and redone if it died meanwhile), so
    when this returns every shard of the list is committed, by this process or another.
    """
    held = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode") as encoders:
        for shard in shards:
            stats = run_claimed_shard(engine, shard, encoders, on_images)
            if stats is not None:
                yield stats
            elif not is_committed(engine.cfg.out, shard):
                held.append(shard)
        for shard in held:
            stats = run_claimed_shard(engine, shard, encoders, on_images, block=True)
            if stats is not None:
                yield stats


class LocalExecutor:
    """Runs shards in this process with one engine (loaded once, here)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        if (cfg.workers or 1) > 1:
            raise UsageError(
                f"--workers {cfg.workers} needs --executor ray (pip install 'synthgen[ray]'); without Ray, start "
                "one 'synthgen generate' per worker on the same --out: shard claims split the work"
            )
        self.engine = load_engine(cfg)

    def run(self, shards: list[int], on_images):
        yield from run_shards(self.engine, shards, on_images)

    def close(self) -> None:
        pass


def make_executor(cfg: GenerateConfig):
    """The executor for `cfg.executor`; both share `run(shards, on_images) -> iterator of stats` and `close()`."""
    if cfg.executor == "ray":
        from synthgen.distributed import RayExecutor

        return RayExecutor(cfg)
    return LocalExecutor(cfg)


def run_generate(cfg: GenerateConfig) -> RunSummary:
    """Resume or start the run described by `cfg`: generate every pending shard in range, then aggregate.

    SIGINT/SIGTERM raise `Interrupted` once the open shard is abandoned and dataset.json is updated.
    """
    from synthgen.runfolder import finalize_run, pending_shards, prepare_run_dir

    with stop_on_signals():
        identity, header, class_names = describe_run(cfg)
        executor = make_executor(cfg)
        try:
            removed = prepare_run_dir(cfg, identity, header)
            todo = pending_shards(cfg)
            results, t0 = _execute(cfg, executor, todo, class_names)
        finally:
            executor.close()
        doc = finalize_run(cfg, class_names)
    start, stop = cfg.shards or (0, cfg.num_shards)
    return RunSummary(
        run_dir=cfg.out,
        shards_written=[r["shard"] for r in results],
        shards_skipped=len(range(start, min(stop, cfg.num_shards))) - len(results),
        images=sum(r["count"] for r in results),
        candidates=sum(r["candidates"] for r in results),
        rejected=sum(r["rejected"] for r in results),
        nonfinite=sum(r["nonfinite"] for r in results),
        exhausted=[r["shard"] for r in results if r["exhausted"]],
        seconds=time.perf_counter() - t0,
        removed_tmp=removed,
        complete=doc["complete"],
    )


def _execute(cfg: GenerateConfig, executor, todo: list[int], class_names: list[str]) -> tuple[list[dict], float]:
    """Run `todo` through the executor with a progress bar; on an interrupt, aggregate what is committed."""
    from tqdm import tqdm

    from synthgen.runfolder import finalize_run

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
        finalize_run(cfg, class_names)
        raise
    finally:
        bar.close()
    return results, t0
