"""Which generate defaults? Speed and training value of sampler / steps / dtype settings, in one run.

For each setting: generate --n images with the default pack (timed end to end, model load excluded), then
train the project's study classifier on them (several seeds) and score it on the real digits test split,
which no model has seen. The default should be the fastest setting whose data is as useful as the
20-step fp32 data the defaults used to produce.

    python bench/defaults_study.py --out bench/results/defaults_cpu     # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SETTINGS = [  # (name, GenerateConfig fields)
    ("dpmpp_2m 20 steps fp32 (old default)", dict(sampler="dpmpp_2m", steps=20, dtype="fp32", batch=32)),
    ("dpmpp_2m 8 steps fp32", dict(sampler="dpmpp_2m", steps=8, dtype="fp32", batch=256)),
    ("dpmpp_2m 4 steps fp32", dict(sampler="dpmpp_2m", steps=4, dtype="fp32", batch=256)),
    ("dpmpp_2m 4 steps bf16", dict(sampler="dpmpp_2m", steps=4, dtype="bf16", batch=256)),
    ("dpmpp_2m 2 steps bf16", dict(sampler="dpmpp_2m", steps=2, dtype="bf16", batch=256)),
    ("ddim 1 step bf16", dict(sampler="ddim", steps=1, dtype="bf16", batch=256)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=6735, help="synthetic images per setting (5x the real train split)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--only", default=None, help="|-separated setting-name prefixes")
    ap.add_argument("--distilled", type=Path, action="append", default=[],
                    help="a pack from 'synthgen train distill' to add as a setting (its own sampler and steps)")
    ap.add_argument("--name", default="defaults", help="result file stem")
    args = ap.parse_args()

    from synthgen.config import GenerateConfig
    from synthgen.export.manifest import cpu_isa
    from synthgen.pipeline import run_generate
    from synthgen.runstate import versions
    from synthgen.train.classifier import ClassifierConfig, evaluate, train_classifier
    from synthgen.train.data import load_images, load_shards

    args.out.mkdir(parents=True, exist_ok=True)
    test = load_images("builtin:digits:test", 16)
    rows = []
    settings = SETTINGS + [(f"distilled {p.name} bf16", dict(pack=p, dtype="bf16", batch=256)) for p in args.distilled]
    if args.distilled:  # the undistilled teacher at the students' step counts, for the comparison
        from synthgen.pack import read_pack_config

        for k in sorted({int(read_pack_config(p).distilled["steps"]) for p in args.distilled}):
            settings.append((f"teacher ddim {k} step(s) bf16", dict(sampler="ddim", steps=k, dtype="bf16", batch=256)))
    for name, fields in settings:
        if args.only and not name.startswith(tuple(args.only.split("|"))):
            continue
        run_dir = args.out / "work" / name.replace(" ", "-")
        summary = run_generate(GenerateConfig(n=args.n, out=run_dir, overwrite=True, progress=False, **fields))
        data = load_shards(str(run_dir), 16)
        top1 = []
        for seed in range(args.seeds):
            model, _ = train_classifier(data, ClassifierConfig(steps=args.classifier_steps, seed=seed, input_size=16),
                                        progress=False)
            top1.append(evaluate(model, test, 16)["top1"])
        row = {"setting": name, **{k: str(v) for k, v in fields.items()}, "images": summary.images, "seconds": round(summary.seconds, 2),
               "images_per_second": round(summary.images_per_second, 1), "top1": top1,
               "mean": statistics.mean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else 0.0}
        rows.append(row)
        print(f"{name:<40} {row['images_per_second']:>8.1f} img/s  top-1 {row['mean']:.4f} ± {row['std']:.4f}",
              flush=True)
    doc = {"n": args.n, "seeds": args.seeds, "classifier_steps": args.classifier_steps, "cpu_isa": cpu_isa(),
           "versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "command": "python bench/defaults_study.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                  vars(args).items() if k != "out" and v)}
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# generate defaults: speed and training value ({doc['cpu_isa']}, {doc['date']})", "",
             f"{args.n} synthetic images per setting, default pack; classifier: ResNet-18 width 16, "
             f"{args.classifier_steps} steps, {args.seeds} seeds, scored on the real digits test split.", "",
             "| setting | batch | img/s (e2e, load excluded) | top-1 mean ± std |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['batch']} | {r['images_per_second']:.1f} | {r['mean']:.4f} ± {r['std']:.4f} |"
              for r in rows]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
