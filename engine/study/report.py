"""The study's report, rebuilt from what is on disk: one JSON row per classifier, one record per generate run.

OUT/study.json holds every row, the aggregates and the setup; OUT/study.md the tables and the targets;
OUT/study.png accuracy against the synthetic multiple, one line per arm and one panel per regime.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from synthgen.study.protocol import CLASS_COND, REAL, REAL_AUG, REAL_SYNTHETIC, SYNTHETIC, StudyScale, study_arms


def write_report(out: Path, scale: StudyScale, setup: dict) -> dict:
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*/*.json"))]
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    cells = aggregate(rows, scale)
    doc = {"setup": setup, "scale": asdict(scale), "environment": _environment(out), "date": time.strftime("%Y-%m-%d"),
           "cells": cells, "targets": targets(cells, scale), "runs": runs, "rows": rows}
    (out / "study.json").write_text(json.dumps(doc, indent=1))
    (out / "study.md").write_text(markdown(doc, scale))
    plot(doc, scale, out / "study.png")
    return doc


def aggregate(rows: list[dict], scale: StudyScale) -> list[dict]:
    """One cell per (regime, arm, multiple) in protocol order: top-1 over seeds, sizes, budget used."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["regime"], row["arm"], row["multiple"]].append(row)
    cells = []
    for regime in scale.regimes:
        for arm in study_arms(scale, regime):
            for multiple in arm.multiples(regime):
                group = sorted(groups.get((regime.name, arm.name, multiple), []), key=lambda r: r["seed"])
                if not group:
                    continue
                top1 = [r["top1"] for r in group]
                cells.append({
                    "regime": regime.name, "arm": arm.name, "multiple": multiple, "seeds": len(group),
                    "mean": statistics.mean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                    "top1": top1, "real_images": group[0]["real_images"],
                    "synthetic_images": group[0]["synthetic_images"],
                    "median_steps": statistics.median(r["steps"] for r in group),
                    "capped": sum(r["stopped"] != "plateau" for r in group), "run": group[0]["run"],
                })
    return cells


def targets(cells: list[dict], scale: StudyScale) -> list[dict]:
    """The issue's targets, on arms named before the study ran (never the best arm picked on test)."""
    index = {(c["regime"], c["arm"], c["multiple"]): c for c in cells}
    out = []

    def check(what: str, regime, arm, versus, margin: float, rule: str) -> None:
        m = regime.multiples[-1]
        a, b = index.get((regime.name, arm.name, m if arm.synthetic else 0)), index.get(
            (regime.name, versus.name, m if versus.synthetic else 0))
        if a is None or b is None:
            return
        diff = a["mean"] - b["mean"]
        out.append({"target": what, "regime": regime.name, "a": f"{arm.name}" + (f" {m}x" if arm.synthetic else ""),
                    "b": f"{versus.name}" + (f" {m}x" if versus.synthetic else ""), "a_mean": a["mean"],
                    "b_mean": b["mean"], "difference": diff, "rule": rule, "met": diff > margin})

    for regime in scale.regimes:
        if regime.shots is None:
            check("synthetic-only within 1 pp of real", regime, SYNTHETIC, REAL, -0.01, "difference > -1 pp")
        else:
            check("real + synthetic beats real + augmentation", regime, REAL_SYNTHETIC, REAL_AUG, 0.0,
                  "difference > 0")
        check("representation- beats class-conditioned", regime, SYNTHETIC, CLASS_COND, 0.0, "difference > 0")
    return out


def markdown(doc: dict, scale: StudyScale) -> str:
    setup, env = doc["setup"], doc["environment"]
    clf = scale.classifier
    lines = [
        f"# Training value of synthetic data: builtin:{setup['dataset']} ({doc['date']})", "",
        f"Real images at {setup['image_size']} px: {setup['splits']['pool']} train (the pool labelled images "
        f"come from), {setup['splits']['holdout']} holdout (early stopping only), {setup['splits']['test']} test "
        "(scored once per classifier, seen by nothing else).",
        f"Generator: `{setup['packs']['rep']['path']}` (pack {setup['packs']['rep']['hash']}"
        + (f", distilled to {setup['packs']['rep']['distilled'].get('steps')} DDIM step(s)"
           if setup['packs']['rep']['distilled'] else "") + "), trained without labels on the whole train split; "
        "the labels of synthetic images come from the bank, which holds only the regime's labelled images. "
        f"Class-conditioned baseline: the teacher's DiT, schedule and budget trained on the labelled images, "
        f"sampled with {scale.class_sampler[0]} {scale.class_sampler[1]} steps. Perturb lambda "
        f"{setup['perturb_lambda']:.4f} (noise norm = {scale.perturb_fraction} x the bank's median "
        "nearest-neighbour distance).",
        f"Classifier: timm {clf['arch']} width {clf['width']} at {clf['input_size']} px, batch {clf['batch']}, "
        f"AdamW; trained to convergence on the holdout: scored every {clf['eval_every']} steps, learning rate "
        f"/10 after {clf['patience']} scores without a better one, stop after {clf['patience']} more, best "
        f"weights kept (cap {clf['steps']} steps); {scale.seeds} seed(s) per cell, mean ± std.",
        f"Machine: {env['cpu_isa']}; generate dtype {env['dtype']}; torch {env['versions'].get('torch', '?')}.", "",
        "## Targets (arms named before the study ran)", "",
        "| target | regime | a | b | a top-1 | b top-1 | a - b | met |", "|---|---|---|---|---:|---:|---:|---|",
    ]
    lines += [f"| {t['target']} | {t['regime']} | {t['a']} | {t['b']} | {t['a_mean']:.4f} | {t['b_mean']:.4f} | "
              f"{100 * t['difference']:+.2f} pp | {'yes' if t['met'] else 'no'} |" for t in doc["targets"]]
    rates = {(r["regime"], r["run"]): r["images_per_second"] for r in doc["runs"]}
    for regime in scale.regimes:
        cells = [c for c in doc["cells"] if c["regime"] == regime.name]
        if not cells:
            continue
        shots = "all pool images" if regime.shots is None else f"{regime.shots} per class"
        lines += ["", f"## {regime.name}: {setup['labelled'].get(regime.name, '?')} labelled real images "
                      f"({shots})", "",
                  "| arm | synthetic | real + synthetic images | top-1 | seeds | steps (median) | gen img/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for c in cells:
            rate = rates.get((c["regime"], c["run"]))
            capped = f" ({c['capped']} at the cap)" if c["capped"] else ""
            lines.append(f"| {c['arm']} | {c['multiple']}x | {c['real_images']} + {c['synthetic_images']} | "
                         f"{c['mean']:.4f} ± {c['std']:.4f} | {c['seeds']} | {c['median_steps']:.0f}{capped} | "
                         f"{'-' if rate is None else f'{rate:.0f}'} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, scale: StudyScale, path: Path) -> bool:
    """Accuracy against the synthetic multiple; real arms as horizontal bands. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return False
    regimes = [r for r in scale.regimes if any(c["regime"] == r.name for c in doc["cells"])]
    if not regimes:
        return False
    # One colour per arm across panels (the few-label regimes run fewer arms), one legend for the figure.
    names = list(dict.fromkeys(a.name for r in regimes for a in study_arms(scale, r)))
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.2 * len(regimes), 4.6), squeeze=False)
    handles = {}
    for ax, regime in zip(axes[0], regimes):
        cells = [c for c in doc["cells"] if c["regime"] == regime.name]
        for arm in study_arms(scale, regime):
            mine = sorted((c for c in cells if c["arm"] == arm.name), key=lambda c: c["multiple"])
            if not mine:
                continue
            color = f"C{names.index(arm.name) % 10}"
            if not arm.synthetic:
                c = mine[0]
                handles[arm.name] = ax.axhline(c["mean"], color=color, ls="--", lw=1.2)
                ax.axhspan(c["mean"] - c["std"], c["mean"] + c["std"], color=color, alpha=0.12)
                continue
            handles[arm.name] = ax.errorbar([c["multiple"] for c in mine], [c["mean"] for c in mine],
                                            yerr=[c["std"] for c in mine], color=color, marker="o", ms=4, capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(regime.multiples, [f"{m}x" for m in regime.multiples])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("synthetic images (x the labelled real images)")
        shots = "all labels" if regime.shots is None else f"{regime.shots} labels per class"
        ax.set_title(f"{doc['setup']['dataset']}: {regime.name} ({shots})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 on the real test split")
    order = [n for n in names if n in handles]
    fig.legend([handles[n] for n in order], order, fontsize=8, loc="lower center", ncol=min(len(order), 6),
               frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _environment(out: Path) -> dict:
    from synthgen.export.manifest import cpu_isa
    from synthgen.runstate import versions

    dtype = "?"
    for doc_path in sorted((out / "runs").glob("*/*/dataset.json")):
        dtype = json.loads(doc_path.read_text()).get("config", {}).get("dtype", dtype)
        break
    return {"cpu_isa": cpu_isa(), "versions": versions(), "dtype": dtype}
