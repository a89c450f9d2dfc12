"""The paper's comparison at small scale: does representation-conditioned synthetic data train classifiers?

Every arm trains the same classifier (same architecture, same optimisation budget in steps) and is scored
on the real digits test split, which no model, bank or filter has seen. Arms:

  real                      the real train split (1347 images), no augmentation
  real + classical aug      the same with classical augmentation
  rep reuse 1x / 5x / 10x   data set size (the 10x arm is the default pack's quality bar)
  real + rep reuse 10x      real plus synthetic, vs real + classical augmentation
  rep perturb / interpolate 5x, class-cond 5x (same DiT, same budget)   vs rep reuse 5x
  rep reuse 5x + min-score (p25 of a pilot's scores) / keep-top 0.5   conditioning-space filtering
  sampler: ddpm 100 vs dpmpp_2m 4 / 8 / 16 at 0.5x (673 images each)

Synthetic sets are generated once per arm (seeded); classifiers are trained with `--seeds` seeds and the
table reports mean and standard deviation of top-1.

    python bench/compare.py --out bench/results/compare            # the full study (~1 h on 2 cores)
    python bench/compare.py --quick --out /tmp/compare             # plumbing check (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REAL_TRAIN, REAL_TEST = "builtin:digits:train", "builtin:digits:test"
REAL_SIZE = 1347


@dataclass
class Arm:
    name: str
    group: str
    pack: str = "rep"  # "rep" | "class" | None for real-only arms
    scale: float = 10.0  # synthetic images = scale x real size
    gen: dict = field(default_factory=dict)  # extra GenerateConfig fields
    real: bool = False  # include the real train split
    aug: str = "none"
    synthetic: bool = True


def arms(quick: bool, taus: tuple[float, float]) -> list[Arm]:
    s = 0.05 if quick else 1.0
    base = [
        Arm("real", "baseline", synthetic=False, real=True),
        Arm("real + classical aug", "baseline", synthetic=False, real=True, aug="standard"),
        Arm("rep reuse 1x", "size", scale=1 * s),
        Arm("rep reuse 5x", "size / conditioning", scale=5 * s),
        Arm("rep reuse 10x", "size", scale=10 * s),
        Arm("real + rep reuse 10x", "real+synthetic", scale=10 * s, real=True),
        Arm("rep perturb 5x", "conditioning", scale=5 * s, gen={"mode": "perturb", "lam": 0.3}),
        Arm("rep interpolate 5x", "conditioning", scale=5 * s, gen={"mode": "interpolate"}),
        Arm(f"rep reuse 5x, min-score {taus[0]:.3f} (p25)", "filtering", scale=5 * s, gen={"min_score": taus[0]}),
        Arm(f"rep reuse 5x, min-score {taus[1]:.3f} (p50)", "filtering", scale=5 * s, gen={"min_score": taus[1]}),
        Arm("rep reuse 5x, keep-top 0.5", "filtering", scale=5 * s, gen={"keep_top": 0.5}),
        Arm("rep reuse 5x, cfg 2", "conditioning", scale=5 * s, gen={"guidance": 2.0}),
        Arm("dpmpp_2m 4 steps 0.5x", "sampler", scale=0.5 * s, gen={"sampler": "dpmpp_2m", "steps": 4}),
        Arm("dpmpp_2m 8 steps 0.5x", "sampler", scale=0.5 * s),
        Arm("dpmpp_2m 16 steps 0.5x", "sampler", scale=0.5 * s, gen={"sampler": "dpmpp_2m", "steps": 16}),
        Arm("ddpm 100 steps 0.5x", "sampler", scale=0.5 * s, gen={"sampler": "ddpm", "steps": 100}),
        Arm("class-cond 5x", "conditioning", pack="class", scale=5 * s),
    ]
    if quick:  # one arm of each kind that needs its own machinery
        keep = {"real", "class-cond 5x", "rep reuse 10x", "rep reuse 5x, keep-top 0.5", "real + rep reuse 10x"}
        base = [a for a in base if a.name in keep]
    return base


# 8 DPM-Solver++ steps without guidance: the study's budget on 2 cores (the sampler arms vary this).
GEN_DEFAULTS = dict(sampler="dpmpp_2m", steps=8, guidance=1.0, shard_size=1000, batch=256, progress=False)


def pilot_taus(pack: Path, work: Path) -> tuple[float, float]:
    """min-score thresholds at the 25th and 50th percentile of 512 unfiltered candidates' scores."""
    import numpy as np

    from synthgen.config import GenerateConfig
    from synthgen.render import render_batch
    from synthgen.runtime import load_runtime

    rt = load_runtime(GenerateConfig(n=512, out=work / "pilot", pack=pack, seed=99, **GEN_DEFAULTS))
    scores = np.concatenate([render_batch(rt, np.arange(i, i + 256)).scores for i in (0, 256)])
    return float(np.nanpercentile(scores, 25)), float(np.nanpercentile(scores, 50))


def arm_size(arm: Arm) -> int:
    return max(10, round(arm.scale * REAL_SIZE))


def arm_key(arm: Arm) -> str:
    return json.dumps([arm.pack, {**GEN_DEFAULTS, **arm.gen}], sort_keys=True)


def generate_arm(arm: Arm, n: int, packs: dict[str, Path], work: Path) -> tuple[Path, dict]:
    """Generate `n` images for the arm's (pack, options). Sample ids do not depend on --n, so arms that
    differ only in size share one run and read a prefix of it."""
    import hashlib

    from synthgen.config import GenerateConfig
    from synthgen.pipeline import run_generate

    options = {**GEN_DEFAULTS, **arm.gen}
    out = work / "runs" / hashlib.sha256(arm_key(arm).encode()).hexdigest()[:12]
    summary = run_generate(GenerateConfig(n=n, out=out, pack=packs[arm.pack], seed=1, **options))
    return out, {"images": summary.images, "candidates": summary.candidates, "seconds": summary.seconds,
                 "images_per_second": summary.images_per_second, "options": options, "run": out.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed, few arms (CI)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="classifier optimisation steps per arm")
    parser.add_argument("--rep-pack", type=Path, default=None, help="default: the shipped default pack")
    parser.add_argument("--class-pack", type=Path, default=None, help="default: trained here (same budget)")
    parser.add_argument("--only", default=None, help="|-separated arm-name prefixes to run (default: all)")
    args = parser.parse_args()
    only = tuple(args.only.split("|")) if args.only else None
    run(args.out, args.quick, 1 if args.quick else args.seeds, 60 if args.quick else args.steps,
        args.rep_pack, args.class_pack, only)


def run(out: Path, quick: bool, seeds: int, steps: int, rep_pack: Path | None, class_pack: Path | None,
        only: tuple[str, ...] | None = None) -> dict:
    from synthgen.cli import concat_sets
    from synthgen.pack import DEFAULT_TEACHER as DEFAULT_PACK  # the study's settings are the teacher's
    from synthgen.train.classifier import ClassifierConfig, evaluate, train_classifier
    from synthgen.train.data import load_images, load_shards

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    rep_pack = rep_pack or DEFAULT_PACK
    class_pack = class_pack or train_class_pack(rep_pack, work / "class-pack", quick)
    packs = {"rep": rep_pack, "class": class_pack}
    test = load_images(REAL_TEST, 16)
    taus = pilot_taus(rep_pack, work)
    results, t0, runs = [], time.perf_counter(), {}
    plan = [a for a in arms(quick, taus) if only is None or a.name.startswith(only)]
    largest = {}
    for arm in plan:
        if arm.synthetic:
            largest[arm_key(arm)] = max(largest.get(arm_key(arm), 0), arm_size(arm))
    for arm in plan:
        parts, gen_info = [], None
        if arm.synthetic:
            key = arm_key(arm)
            if key not in runs:
                runs[key] = generate_arm(arm, largest[key], packs, work)
            run_dir, gen_info = runs[key]
            parts.append(load_shards(str(run_dir), 16, limit=arm_size(arm)))
        if arm.real:
            parts.append(load_images(REAL_TRAIN, 16))
        data = concat_sets(parts)
        top1 = []
        for seed in range(seeds):
            config = ClassifierConfig(steps=steps, aug=arm.aug, seed=seed, input_size=16)
            model, _ = train_classifier(data, config, progress=False)
            top1.append(evaluate(model, test, 16)["top1"])
        row = {**asdict(arm), "train_images": len(data), "top1": top1, "mean": statistics.mean(top1),
               "std": statistics.stdev(top1) if len(top1) > 1 else 0.0, "generation": gen_info}
        results.append(row)
        print(f"{arm.name:<32} n={len(data):>6}  top-1 {row['mean']:.4f} ± {row['std']:.4f}", flush=True)
    doc = {"quick": quick, "seeds": seeds, "min_score_taus": taus, "generation_defaults": GEN_DEFAULTS,
           "classifier_steps": steps, "rep_pack": str(rep_pack), "class_pack": str(class_pack),
           "seconds": time.perf_counter() - t0, "results": results}
    if only is not None and (out / "compare.json").is_file():
        doc = merge_rows(json.loads((out / "compare.json").read_text()), doc, [a.name for a in arms(quick, taus)])
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    (out / "compare.md").write_text(markdown_table(doc))
    plot(doc, out / "compare.png")
    return doc


def merge_rows(previous: dict, update: dict, order: list[str]) -> dict:
    """An --only run replaces its arms' rows in the previous study and keeps the rest, in study order.

    Only valid when both ran on the same packs, seeds and classifier budget; anything else is refused.
    """
    same = lambda v: json.loads(json.dumps(v))  # noqa: E731 - compare as stored (tuples become lists)
    for key in ("quick", "seeds", "classifier_steps", "rep_pack", "class_pack", "min_score_taus"):
        if same(previous.get(key)) != same(update.get(key)):
            raise SystemExit(f"cannot merge into the previous compare.json: {key} differs "
                             f"({previous.get(key)!r} vs {update.get(key)!r}); rerun the whole study")
    rows = {r["name"]: r for r in previous["results"]} | {r["name"]: r for r in update["results"]}
    rank = {name: i for i, name in enumerate(order)}
    merged = sorted(rows.values(), key=lambda r: rank.get(r["name"], len(rank)))
    return {**previous, "results": merged, "seconds": previous["seconds"] + update["seconds"],
            "merged_runs": previous.get("merged_runs", 1) + 1}


def train_class_pack(rep_pack: Path, out: Path, quick: bool) -> Path:
    """The class-conditioned baseline: the same DiT and training budget as the rep pack's denoiser."""
    from dataclasses import replace

    from synthgen.train.denoiser import DenoiserTrainConfig
    from synthgen.train.packs import train_denoiser_into_pack

    if (out / "pack.json").is_file() and (out / "denoiser.safetensors").is_file():
        return out
    log = json.loads((rep_pack / "training.json").read_text()) if (rep_pack / "training.json").is_file() else {}
    den = DenoiserTrainConfig(**log["denoiser"]["config"]) if "denoiser" in log else DenoiserTrainConfig()
    if quick:
        den = replace(den, steps=30, checkpoint_every=30)
    return train_denoiser_into_pack(rep_pack, REAL_TRAIN, None, replace(den, cond="class"), out=out, progress=False)


def markdown_table(doc: dict) -> str:
    lines = [
        f"Classifier: resnet18 (width 16) at 16 px, {doc['classifier_steps']} steps, {doc['seeds']} seed(s); "
        "top-1 on the real digits test split (450 images).", "",
        "| arm | group | train images | top-1 mean | std | gen img/s |", "|---|---|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        rate = r["generation"]["images_per_second"] if r["generation"] else None
        # 0 img/s: the run folder was complete from an earlier invocation and resume generated nothing.
        rate = "-" if rate is None else "cached" if rate == 0 else f"{rate:.0f}"
        lines.append(f"| {r['name']} | {r['group']} | {r['train_images']} | {r['mean']:.4f} | {r['std']:.4f} | {rate} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1))
    ax.barh([r["name"] for r in rows], [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlim(min(r["mean"] for r in rows) - 0.05, 1.0)
    ax.set_xlabel("top-1 on real digits test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
