"""Throughput of 1 vs N local generate workers sharing one run folder (shard claims split the work).

Same pack, bank, seed and options for every row; each row generates the same images into a fresh folder.
With W workers each process gets cores // W intra-op threads, so the comparison is "one process using the
whole machine" against "W processes splitting it". Prints a table and writes JSON.

    python bench/bench_scaling.py --n 2000 --workers 1,2 --json bench/results/scaling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_workers(workers: int, args, root: Path) -> float:
    out = root / f"run-w{workers}"
    cmd = [sys.executable, "-c", "from synthgen.cli import main; main()", "generate", "--n", str(args.n),
           "--out", str(out), "--shard-size", str(args.shard_size), "--steps", str(args.steps),
           "--batch", str(args.batch), "--no-progress"]
    if args.pack:
        cmd += ["--pack", str(args.pack)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed ({p.returncode}): {err.decode()[-2000:]}")
    seconds = time.perf_counter() - start
    check = subprocess.run([sys.executable, "-c", "from synthgen.cli import main; main()", "verify", str(out)],
                           capture_output=True, text=True)
    if check.returncode:
        raise SystemExit(f"verify failed for {workers} workers: {check.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=None, help="default: the shipped default pack")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in [int(x) for x in args.workers.split(",")]:
            seconds = run_workers(w, args, Path(tmp))
            rows.append({"workers": w, "seconds": seconds, "images_per_second": args.n / seconds})
    base = rows[0]["images_per_second"]
    print(f"{'workers':>7} {'seconds':>8} {'img/s':>8} {'ratio':>6}   (n={args.n}, steps={args.steps}, "
          f"{os.cpu_count()} cores; includes process start and model load)")
    for r in rows:
        r["ratio"] = r["images_per_second"] / base
        print(f"{r['workers']:>7} {r['seconds']:>8.1f} {r['images_per_second']:>8.1f} {r['ratio']:>6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
