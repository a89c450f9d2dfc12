"""Is the study's budget rule converged? The same cells trained with twice the patience, side by side.

`synthgen study` stops each classifier on its holdout (learning rate /10 after 3 scores without a better
one, stop after 3 more). If that stopped training too early, a more patient rule would score higher, and more
so for some arms than for others. This reruns chosen cells of a finished study (at the largest synthetic size
unless --all-sizes) with --patience (default 6) and twice the step cap, reading the study's packs, banks and
generate runs (nothing is generated again), and prints both rules' top-1 per cell.

    python bench/study_budget.py --study studies/digits --out studies/budget_digits
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from synthgen.study.protocol import FULL, arms

CELLS = ("real", "real + aug", "synthetic", "real + synthetic", "class-conditioned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a finished `synthgen study` folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--regime", default="full", choices=[r.name for r in FULL.regimes])
    ap.add_argument("--arms", default="|".join(CELLS), help="|-separated arm names")
    ap.add_argument("--all-sizes", action="store_true", help="every synthetic size (default: the largest only)")
    args = ap.parse_args()

    # Checked before anything trains: the comparison needs the finished study's report, and its data set.
    report = args.study / "study.json"
    if not report.is_file():
        ap.error(f"{report} does not exist: run `synthgen study --out {args.study}` to the end first")
    base = json.loads(report.read_text())
    regime = next(r for r in FULL.regimes if r.name == args.regime)
    known = [a.name for a in arms(regime)]
    unknown = [name for name in args.arms.split("|") if name not in known]
    if unknown:
        ap.error(f"--arms: {unknown} not in the {regime.name} regime; its arms are {known}")

    from synthgen.study.runner import run_study

    args.out.mkdir(parents=True, exist_ok=True)
    for shared in ("packs", "banks", "runs", "data"):  # the study's own inputs, read as they are
        link = args.out / shared
        if not link.exists() and (args.study / shared).exists():
            os.symlink((args.study / shared).resolve(), link)
    if not args.all_sizes:
        regime = replace(regime, multiples=regime.multiples[-1:])
    scale = replace(FULL, regimes=(regime,), arm_names=tuple(args.arms.split("|")),
                    classifier=dict(FULL.classifier, patience=args.patience, steps=2 * FULL.classifier["steps"]))
    dataset = base["setup"]["dataset"]
    patient = run_study(dataset, args.out, scale)
    index = {(c["regime"], c["arm"], c["multiple"]): c for c in base["cells"]}
    lines = [f"# Budget check: patience {FULL.classifier['patience']} (the study) vs {args.patience}, "
             f"{dataset} {args.regime}", "",
             "| arm | synthetic | top-1, study rule | top-1, patient rule | difference | median steps (study / patient) |",
             "|---|---:|---:|---:|---:|---:|"]
    for cell in patient["cells"]:
        ref = index.get((cell["regime"], cell["arm"], cell["multiple"]))
        if ref is None:
            continue
        lines.append(f"| {cell['arm']} | {cell['multiple']}x | {ref['mean']:.4f} ± {ref['std']:.4f} | "
                     f"{cell['mean']:.4f} ± {cell['std']:.4f} | {100 * (cell['mean'] - ref['mean']):+.2f} pp | "
                     f"{ref['median_steps']:.0f} / {cell['median_steps']:.0f} |")
    (args.out / "budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
