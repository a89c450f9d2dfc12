"""Does a pack draw the class of its condition? An independent judge scores generated digits.

The judge is scikit-learn's SVC trained on the real 8x8 digits train split (raw pixels, no part of synthgen;
99.1 % top-1 on the test split). Generated 16 px images are averaged over channels, pooled 2x2 back to 8x8 and
scaled to the 0..16 range of `load_digits`; agreement is the fraction the judge assigns to the class of the
bank row that conditioned them. Chance is 10 %. Also reports the mean filter score cos(enc(x), c).

    python bench/fidelity.py --cfg 1,2,4 --json bench/results/fidelity_default.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def judge():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from synthgen.sources import digits_split

    digits, (train, test) = load_digits(), digits_split()
    svc = SVC(gamma=0.001).fit(digits.data[train], digits.target[train])
    return svc, float((svc.predict(digits.data[test]) == digits.target[test]).mean())


def to_digits_pixels(images: np.ndarray) -> np.ndarray:
    """(B, 16, 16, 3) uint8 -> (B, 64) float in load_digits' 0..16 scale."""
    gray = images.astype(np.float32).mean(-1)
    return (gray.reshape(len(images), 8, 2, 8, 2).mean((2, 4)) * 16 / 255).reshape(len(images), 64)


def agreement(pack: Path | None, cfg: float, steps: int, sampler: str, n: int, svc) -> dict:
    from synthgen.config import GenerateConfig
    from synthgen.render import render_batch
    from synthgen.runtime import load_runtime

    start = time.perf_counter()
    rt = load_runtime(GenerateConfig(n=n, out=Path("unused"), pack=pack, guidance=cfg, steps=steps, sampler=sampler))
    result = render_batch(rt, np.arange(n, dtype=np.int64))
    predicted = svc.predict(to_digits_pixels(result.images))
    return {"cfg": cfg, "steps": steps, "sampler": sampler, "n": n,
            "agreement": round(float((predicted == np.asarray(result.plan.labels)).mean()), 4),
            "mean_score": round(float(np.nanmean(result.scores)), 4),
            "judge_histogram": np.bincount(predicted, minlength=10).tolist(),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=None, help="default: the shipped default pack")
    parser.add_argument("--cfg", default="1,2,4", help="comma-separated guidance scales")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--n", type=int, default=400, help="samples per row (class-balanced plan)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    svc, real_top1 = judge()
    rows = [agreement(args.pack, float(c), args.steps, args.sampler, args.n, svc) for c in args.cfg.split(",")]
    print(f"judge: SVC on real 8x8 train pixels, top-1 {real_top1:.3f} on the real test split")
    print(f"{'cfg':>5} {'agreement':>10} {'mean score':>11}  judge's class histogram")
    for r in rows:
        print(f"{r['cfg']:>5} {r['agreement']:>10.3f} {r['mean_score']:>11.3f}  {r['judge_histogram']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"pack": str(args.pack or "default"), "judge_real_top1": real_top1, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
