"""Peak RSS of `synthgen generate` at two sizes of --n: memory must stay bounded by the queues, not grow with n.

Each size runs in its own process (a fresh interpreter, so peaks do not mix) on a random `tiny` pack and a
bank of the digits train split; ru_maxrss of the child is its peak resident set. The issue's target: the peak
at --n 100k within 10 % of the peak at --n 10k.

    python bench/bench_memory.py --sizes 10000,100000 --json bench/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import resource, sys, time
from synthgen.config import GenerateConfig
from synthgen.pipeline import run_generate
n, out, pack, bank, steps = sys.argv[1:]
start = time.perf_counter()
summary = run_generate(GenerateConfig(n=int(n), out=out, pack=pack, bank=bank, sampler="ddim", steps=int(steps),
                                      shard_size=10000, batch=256, progress=False))
print(summary.images, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from synthgen.cli import main; main()", *args], check=True,
                   stdout=subprocess.DEVNULL)


def measure(n: int, root: Path, pack: Path, bank: Path, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(root / f"run-{n}"), str(pack), str(bank),
                           str(steps)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"generate --n {n} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    images, seconds, peak_kib = done.stdout.split()[-3:]
    return {"n": n, "images": int(images), "seconds": round(float(seconds), 1),
            "images_per_second": round(int(images) / float(seconds), 1), "peak_rss_mib": round(int(peak_kib) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated --n values, smallest first")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps (1 keeps the 100k run short)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pack, bank = root / "pack", root / "bank"
        cli("pack", "random", "--preset", "tiny", "--out", str(pack))
        cli("embed", "--images", "builtin:digits:train", "--pack", str(pack), "--out", str(bank))
        rows = [measure(n, root, pack, bank, args.steps) for n in sizes]
    base = rows[0]["peak_rss_mib"]
    for row in rows:
        row["peak_vs_smallest"] = round(row["peak_rss_mib"] / base, 3)
    print(f"{'--n':>8} {'images':>8} {'s':>8} {'img/s':>8} {'peak RSS MiB':>13} {'vs smallest':>12}")
    for r in rows:
        print(f"{r['n']:>8} {r['images']:>8} {r['seconds']:>8} {r['images_per_second']:>8} {r['peak_rss_mib']:>13} "
              f"{r['peak_vs_smallest']:>12}")
    if args.json:
        doc = {"rows": rows, "steps": args.steps, "preset": "tiny", "python": platform.python_version(),
               "threads": os.environ.get("OMP_NUM_THREADS"), "load_before": os.getloadavg(),
               "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
