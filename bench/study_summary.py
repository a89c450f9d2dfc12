"""One table across studies: each arm's top-1 per data set and regime, at the regime's largest synthetic size
(or the largest the arm ran at, named in brackets).

    python bench/study_summary.py bench/results/study/digits.json bench/results/study/mnist5k.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(docs: list[dict]) -> str:
    columns = [(d["setup"]["dataset"], r["name"], max(r["multiples"])) for d in docs for r in d["scale"]["regimes"]]
    cells = {(d["setup"]["dataset"], c["regime"], c["arm"], c["multiple"]): c for d in docs for c in d["cells"]}
    arms = list(dict.fromkeys(c["arm"] for d in docs for c in d["cells"]))
    labelled = {(d["setup"]["dataset"], name): n for d in docs for name, n in d["setup"]["labelled"].items()}
    head = [f"{ds} {regime} ({labelled.get((ds, regime), '?')} real, {m}x)" for ds, regime, m in columns]
    lines = ["| arm | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for arm in arms:
        row = []
        for ds, regime, m in columns:
            ran = [k[3] for k in cells if k[:3] == (ds, regime, arm)]
            c = cells[ds, regime, arm, max(ran)] if ran else None
            note = "" if c is None or c["multiple"] in (0, m) else f" ({c['multiple']}x)"
            row.append("-" if c is None else f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}{note}")
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary([json.loads(Path(p).read_text()) for p in sys.argv[1:]]), end="")
