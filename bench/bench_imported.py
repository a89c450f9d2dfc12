"""Throughput of an IMPORTED pack at the published recipe's shapes: `pack import`, then `synthgen bench --pack`.

The sources are built with the real classes at the published sizes (random weights: no checkpoint can be
downloaded here) and saved the way users hold them: a transformers Dinov2Model folder (ViT-B/14, 518 px
config), the SD-1.x UNet2DConditionModel with one 768-d cross-attention token pickled whole with torch.save
(the published training code's format), an SD-VAE AutoencoderKL folder and the SD-1.x schedule. The import
itself is timed, then the same bench as `synthgen bench` runs on the imported pack.

    python bench/bench_imported.py --out bench/results/bench_cpu_imported_paper --steps 1 --batch 1,2 --n 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def write_sources(root: Path) -> dict[str, Path]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Dinov2Config, Dinov2Model

    from synthgen.presets import SD_UNET, SD_VAE

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                             image_size=518)).save_pretrained(root / "dinov2-base")
    torch.save(UNet2DConditionModel(**SD_UNET).half(), root / "rep_ldm_unet.pt")  # fp16 halves the file
    AutoencoderKL(**SD_VAE).save_pretrained(root / "sd-vae")
    return {"encoder": root / "dinov2-base", "denoiser": root / "rep_ldm_unet.pt", "vae": root / "sd-vae"}


def main() -> None:
    from synthgen.benchmark import markdown, run_bench, table_lines, write_json
    from synthgen.config import BenchConfig
    from synthgen.importing.pack_import import ImportOptions, import_pack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Result files OUT.md and OUT.json.")
    ap.add_argument("--steps", default="1")
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--n", default="4")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="synthgen-imported-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        sources = write_sources(tmp / "sources")
        t1 = time.perf_counter()
        report = import_pack(ImportOptions(**sources, scheduler="sd", recipe="rep-ldm-dinov2", trust_pickle=True,
                                           out=tmp / "pack"))
        t2 = time.perf_counter()
        print(f"sources written in {t1 - t0:.1f} s; pack import (pickle -> safetensors, checks) in {t2 - t1:.1f} s")
        cfg = BenchConfig(pack=tmp / "pack", steps=args.steps, batches=args.batch, n=args.n, dtype=args.dtype,
                          device=args.device, repeats=args.repeats, naive_batch=2)
        argv = ["bench_imported.py", *(f"--{k} {v}" for k, v in vars(args).items() if k != "out")]
        result = run_bench(cfg, argv=argv)
    result.notes.append(f"pack import of the paper-shaped sources: {t2 - t1:.1f} s "
                        f"({report.config.description}); recipe {report.recipe.name}")
    for line in table_lines(result):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out.with_suffix(".json"))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({"wrote": [str(args.out.with_suffix(".md")), str(args.out.with_suffix(".json"))]}))


if __name__ == "__main__":
    main()
