"""Start-up cost of the command line: `synthgen --help`, and `synthgen generate --n 8` to its first shard.

Each command runs in a fresh process (--runs times, median reported), so imports and model loading are
counted as a user meets them.

    python bench/bench_startup.py --json bench/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "from synthgen.cli import main; main()"]


def seconds(args: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*CLI, *args], check=True, capture_output=True)
        out.append(round(time.perf_counter() - start, 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "synthgen --help": seconds(["--help"], args.runs),
            "synthgen generate --n 8 (default pack)": seconds(
                ["generate", "--n", "8", "--out", f"{tmp}/run", "--overwrite", "--no-progress"], args.runs),
        }
    from synthgen.export.manifest import cpu_isa
    from synthgen.runstate import versions

    doc = {"runs": args.runs, "cpu_isa": cpu_isa(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
           "seconds": rows, "median_s": {k: statistics.median(v) for k, v in rows.items()}}
    for name, value in doc["median_s"].items():
        print(f"{name:<42} {value:.2f} s (median of {args.runs})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
