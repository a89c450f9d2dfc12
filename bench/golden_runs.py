"""Reference runs whose shard bytes must not change across a refactor: record them, then check them.

    python bench/golden_runs.py --record bench/results/golden_cpu.json     # before the change
    python bench/golden_runs.py --check bench/results/golden_cpu.json      # after it: exit 1 on any difference

Runs (all on the CPU, fp32, one process): the shipped default pack; a random tiny pack with guidance,
perturbation and a score filter; the same run resumed after its first two shards; a --shards range. Bytes
are only comparable on the same machine class (CPU ISA and library versions are recorded beside them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path


def _shard_hashes(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("*.tar"))}


def runs(root: Path) -> dict[str, dict[str, str]]:
    from synthgen.bank import build_bank
    from synthgen.config import GenerateConfig
    from synthgen.pipeline import run_generate
    from synthgen.presets import write_random_pack

    write_random_pack("tiny", root / "tiny", seed=0)
    build_bank("builtin:digits:test", root / "tiny", root / "bank", progress=False)
    # The settings the defaults had when these were recorded, spelled out: the check is of the engine, and
    # the defaults have moved since (issue: fast defaults).
    common = dict(device="cpu", progress=False, dtype="fp32")
    filtered = dict(n=60, pack=root / "tiny", bank=root / "bank", sampler="dpmpp_2m", steps=4, guidance=2.0,
                    mode="perturb", lam=0.05, min_score=0.3, shard_size=20, batch=8, **common)
    out = {}
    from synthgen.pack import DEFAULT_TEACHER  # the default pack when these were recorded

    run_generate(GenerateConfig(n=200, out=root / "default", pack=DEFAULT_TEACHER, shard_size=50, steps=8,
                                sampler="dpmpp_2m", batch=32, **common))
    out["default_pack"] = _shard_hashes(root / "default")
    run_generate(GenerateConfig(out=root / "filtered", **filtered))
    out["tiny_filtered"] = _shard_hashes(root / "filtered")
    run_generate(GenerateConfig(out=root / "resumed", shards="0:2", **filtered))
    run_generate(GenerateConfig(out=root / "resumed", **{**filtered, "batch": 5}))
    out["tiny_filtered_resumed"] = _shard_hashes(root / "resumed")
    run_generate(GenerateConfig(out=root / "range", shards="1:3", **filtered))
    out["tiny_filtered_shards_1_3"] = _shard_hashes(root / "range")
    return out


def main() -> int:
    from synthgen.export.manifest import cpu_isa
    from synthgen.runstate import versions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path)
    group.add_argument("--check", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="synthgen-golden-") as tmp:
        hashes = runs(Path(tmp))
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        doc = {"cpu_isa": cpu_isa(), "versions": versions(), "runs": hashes}
        args.record.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v) for v in hashes.values())} shard hashes in {args.record}")
        return 0
    want = json.loads(args.check.read_text())["runs"]
    bad = [f"{run}/{name}" for run in want for name in set(want[run]) | set(hashes.get(run, {}))
           if want[run].get(name) != hashes.get(run, {}).get(name)]
    print("byte-identical: every shard of every run" if not bad else f"DIFFERENT: {', '.join(sorted(bad))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
