"""generate's device stage inline in the calling thread vs in a device thread (`--overlap`), side by side.

    python bench/bench_overlap.py                                   # small preset, bf16, 4 steps, batch 8,32
    python bench/bench_overlap.py --dtype fp32 --steps 20 --batch 32 --json bench/results/overlap_cpu.json

Each measurement is a fresh process (a thread that ran torch leaves its OpenMP team behind for the life of
the process, which would bias whatever ran after it), alternating modes, `--repeats` times; medians.
A process loads the engine, generates one warm-up batch in the calling thread, times that thread's serial
loop over the same ids (`generate_batch` back to back: the ceiling, no writing), then times `run_shards`
(decide, encode, write, commit) with the mode under test. Prints a table and writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from synthgen.config import GenerateConfig
from synthgen.pipeline import describe_run
from synthgen.render import render_batch
from synthgen.runstate import prepare_run, run_folder
from synthgen.runtime import load_runtime
from synthgen.shard_job import run_shards

args = json.loads(sys.argv[1])
cfg = GenerateConfig(**args, progress=False, overwrite=True)
identity, header, _ = describe_run(cfg)
rt = load_runtime(cfg)
render_batch(rt, np.arange(cfg.batch))  # first-call costs (allocator, oneDNN primitives)
start = time.perf_counter()
for first in range(0, cfg.n, cfg.batch):
    render_batch(rt, np.arange(first, min(first + cfg.batch, cfg.n)))
serial = time.perf_counter() - start
folder = run_folder(cfg)
prepare_run(folder, cfg, identity, header)
start = time.perf_counter()
list(run_shards(rt, folder, [0]))
print(json.dumps({"serial_s": serial, "run_s": time.perf_counter() - start}))
"""


def measure(settings: dict, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=None, help="default: a random-weight pack of --preset")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from synthgen.bank import build_bank
    from synthgen.export.manifest import cpu_native_bf16, device_info
    from synthgen.presets import write_random_pack

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        tmp = Path(tmp)
        pack = args.pack
        if pack is None:
            write_random_pack(args.preset, tmp / "pack", seed=0)
            pack = tmp / "pack"
        bank = pack / "bank" if (pack / "bank" / "bank.json").is_file() else tmp / "bank"
        if bank == tmp / "bank":
            build_bank("builtin:digits:train", pack, bank, 64, "cpu", __import__("torch").float32, progress=False)
        for batch in [int(b) for b in args.batch.split(",")]:
            runs = {"inline": [], "thread": []}
            for _ in range(args.repeats):
                for overlap in runs:  # alternating, so drifting load moves both modes alike
                    settings = dict(n=args.n, out=str(tmp / "run"), pack=str(pack), bank=str(bank), steps=args.steps,
                                    guidance=args.cfg, dtype=args.dtype, backend=args.backend, batch=batch,
                                    shard_size=args.n, overlap=overlap)
                    runs[overlap].append(measure(settings, env))
            row = {"batch": batch}
            for overlap, results in runs.items():
                row[overlap] = {
                    "images_per_s": args.n / statistics.median(r["run_s"] for r in results),
                    "serial_images_per_s": args.n / statistics.median(r["serial_s"] for r in results),
                    "runs": results,
                }
            row["inline_vs_thread"] = row["inline"]["images_per_s"] / row["thread"]["images_per_s"]
            rows.append(row)
            print(_line(row), flush=True)
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device_info("cpu"),
           "cpu_native_bf16": cpu_native_bf16(), "cores": os.cpu_count(), "rows": rows,
           "command": "python bench/bench_overlap.py " + " ".join(sys.argv[1:])}
    print(_markdown(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
        args.json.with_suffix(".md").write_text(_markdown(doc))


def _line(r: dict) -> str:
    return (f"batch {r['batch']:>3}: inline {r['inline']['images_per_s']:.1f} img/s (serial ceiling "
            f"{r['inline']['serial_images_per_s']:.1f}), thread {r['thread']['images_per_s']:.1f} img/s, "
            f"inline/thread {r['inline_vs_thread']:.2f}x")


def _markdown(doc: dict) -> str:
    a = doc["args"]
    lines = [
        f"# generate --overlap inline vs thread ({doc['device']['name']}, {doc['cores']} cores)", "",
        f"`{doc['command']}`", "",
        f"pack {a['pack'] if a['pack'] != 'None' else a['preset'] + ' preset (random weights)'}, {a['dtype']}, "
        f"backend {a['backend']}, {a['steps']} steps, cfg {a['cfg']}, {a['n']} images per run, median of "
        f"{a['repeats']} fresh processes per mode; native bf16: {doc['cpu_native_bf16']}", "",
        "| batch | inline img/s | thread img/s | inline / thread | serial generate_batch loop img/s (inline / thread process) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(f"| {r['batch']} | {r['inline']['images_per_s']:.1f} | {r['thread']['images_per_s']:.1f} | "
                     f"{r['inline_vs_thread']:.2f}x | {r['inline']['serial_images_per_s']:.1f} / "
                     f"{r['thread']['serial_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
