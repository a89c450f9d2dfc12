"""Backends side by side: images/s per component, backend and precision at several batch sizes, one run.

    python bench/bench_backends.py                      # small preset, batches 8 and 64, this machine
    python bench/bench_backends.py --batches 8,32,64 --repeats 5
    python bench/bench_backends.py --device cuda --preset paper --batches 8,32 \
        --configs "eager fp16,compile fp16,trt fp16,ort fp16" --baseline "eager fp16"   # a GPU machine

For each (component, batch) every configuration sees the same random inputs; the ratio is against
`--baseline` (eager fp32 unless told) at that batch, the error is max|y - y_eager_fp32| / max|y_eager_fp32|.
A configuration that cannot run here (no TensorRT, no CUDA execution provider) is a "skipped" row saying
why. Median of --repeats after one warm-up call; build (export / compile) time is reported apart.
FLOP/img comes from synthgen.flops and the share of peak uses the fastest square matmul per precision
measured in the same run (2048^3 on a CPU, 8192^3 on a GPU). Writes a table and
bench/results/backends_<device>.json + .md (device: cuda, or cpu_<isa> such as cpu_avx512bf16).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from synthgen.benchmark import matmul_peak
from synthgen.engines import COMPONENT_IO, random_inputs
from synthgen.export.timing import median_seconds
from synthgen.errors import UsageError
from synthgen.export.backends import (
    TORCH_DTYPES, BackendUnavailable, CompiledBackend, EagerBackend, OrtBackend, aot_compile, ort_session,
    output_error, unavailable_reason,
)
from synthgen.export.manifest import cpu_native_bf16, device_info, library_versions
from synthgen.flops import pack_costs
from synthgen.pack import load_pack
from synthgen.presets import write_random_pack

RESULTS = Path(__file__).parent / "results"


def build(config_name: str, pack, component: str, batch: int, work: Path, device: torch.device):
    """(backend, build seconds) for one configuration name like 'ort fp32'."""
    backend, precision = config_name.split()
    module = getattr(pack, component)
    io = COMPONENT_IO[component]
    dtype = TORCH_DTYPES[precision]
    start = time.perf_counter()
    if backend == "eager":
        low = module if dtype == torch.float32 else copy.deepcopy(module).to(dtype)
        return EagerBackend(low, io.keep_dtype), 0.0
    if backend == "compile":
        low = copy.deepcopy(module).to(dtype)
        example = tuple(x if i in io.keep_dtype else x.to(dtype) for i, x in
                        enumerate(random_inputs(pack.config, component, batch, 0, device)))
        path = aot_compile(low, example, work / f"{component}.{precision}.b{batch}.pt2")
        return CompiledBackend.from_packages({batch: path}, device, dtype, io.keep_dtype), time.perf_counter() - start
    if backend == "trt":  # the engine builder's own path: ONNX export, parser, one profile at this batch
        from synthgen.engines import build_engine, load_backends

        folder = work / f"trt-{component}-{precision}-b{batch}"
        build_engine(pack.root, folder, "trt", precision, batch=batch, buckets=(batch,), device=device,
                     components=(component,))
        return load_backends(folder, pack, device)[component], time.perf_counter() - start
    from synthgen.export.onnx_export import export_onnx

    onnx_path = work / f"{component}.onnx"
    if not onnx_path.exists():
        export_onnx(module, random_inputs(pack.config, component, 2, 0, device), onnx_path, list(io.inputs),
                    [io.output])
    path = onnx_path
    if precision == "fp16":
        import onnx

        from synthgen.export.precision import convert_precision

        path = work / f"{component}.fp16.onnx"
        if not path.exists():
            onnx.save(convert_precision(onnx.load(str(onnx_path)), "fp16"), str(path))
    optimized = path.with_suffix(f".{device.type}.opt.onnx")
    ort_session(path, device, optimized_path=optimized)
    return OrtBackend.load(optimized, device, dtype, 1 << 16, preoptimized=True), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--components", default="denoiser,vae,encoder")
    ap.add_argument("--configs", default="eager fp32,eager bf16,ort fp32,ort fp16,compile bf16")
    ap.add_argument("--compile-batches", default="64", help="batches at which compile (AOTInductor) is built")
    ap.add_argument("--slow-call-s", type=float, default=4.0, help="time slower configurations once")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--baseline", default="eager fp32", help="the configuration every ratio is against")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    configs = [c.strip() for c in args.configs.split(",")]
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    write_random_pack(args.preset, work / "pack")
    pack = load_pack(work / "pack", device=device, dtype=torch.float32)
    flops = {c.name: c.flops for c in pack_costs(pack.config)}
    # Fastest of several 2048^3 matmuls after a warm-up: a single cold call measures thread start-up, not
    # the machine (an earlier version of this file did that and reported shares of "peak" above 100 %).
    size, precisions = (8192, ("fp32", "bf16", "fp16")) if device.type == "cuda" else (2048, ("fp32", "bf16"))
    peaks = {p: matmul_peak(TORCH_DTYPES[p], size, device) for p in precisions}
    rows = []
    for component in args.components.split(","):
        if getattr(pack, component, None) is None:
            continue
        for batch in batches:
            inputs = random_inputs(pack.config, component, batch, seed=batch, device=device)
            with torch.inference_mode():
                reference = getattr(pack, component)(*inputs)
            base = fp32 = None
            for name in configs:
                backend_name, precision = name.split()
                if backend_name == "compile" and batch not in compile_batches:
                    continue
                reason = unavailable_reason(backend_name, device, precision)
                if reason is None:
                    try:
                        backend, built = build(name, pack, component, batch, work, device)
                    except (BackendUnavailable, UsageError) as e:  # e.g. onnxruntime without its CUDA provider
                        reason = str(e)
                if reason:
                    rows.append({"component": component, "batch": batch, "config": name, "skipped": reason})
                    print(f"{component:<9} b={batch:<4} {name:<13} skipped: {reason}", flush=True)
                    continue
                with torch.inference_mode():
                    start = time.perf_counter()
                    out = backend.run(*inputs)
                    first = time.perf_counter() - start
                    # A configuration that is hopeless here (e.g. bf16 emulated without AVX-512-BF16) is timed
                    # once instead of warm-up + repeats, so one run stays within minutes.
                    seconds = first if first > args.slow_call_s else median_seconds(
                        lambda: backend.run(*inputs), device, warmup=0, repeats=args.repeats)
                err = output_error(reference, out)
                base = seconds if name == args.baseline else base
                fp32 = seconds if name == "eager fp32" else fp32
                per_img = flops.get(component, 0)
                peak = peaks.get(precision, peaks["fp32"])
                rows.append({
                    "component": component, "batch": batch, "config": name, "images_per_s": batch / seconds,
                    "seconds": seconds, "ratio_vs_baseline": (base / seconds) if base else None,
                    "ratio_vs_eager_fp32": (fp32 / seconds) if fp32 else None,
                    "timed_once": first > args.slow_call_s, "max_rel_err": err["max_rel"], "max_abs_err": err["max_abs"], "build_s": round(built, 1),
                    "gflop_per_img": per_img / 1e9, "share_of_peak": per_img * batch / seconds / peak,
                })
                print(_line(rows[-1]), flush=True)
    doc = {
        "preset": args.preset, "device": device_info(device), "machine": platform.platform(),
        "baseline": args.baseline,
        "versions": library_versions(), "threads": torch.get_num_threads(), "cpu_native_bf16": cpu_native_bf16(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "command": "python bench/bench_backends.py " + " ".join(
            f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items() if v is not None),
        "rows": rows,
    }
    out = args.out or RESULTS / f"backends_{_machine_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(_markdown(doc))
    print(_markdown(doc))


def _machine_tag(device: torch.device) -> str:
    """cuda, or cpu_avx512bf16 / cpu_avx512 / cpu_avx2: CPU results differ by ISA more than by anything else."""
    if device.type == "cuda":
        return "cuda"
    isa = device_info("cpu")["isa"]
    return "cpu_" + ("avx512bf16" if cpu_native_bf16() else "avx512" if "avx512f" in isa else
                     "avx2" if "avx2" in isa else "generic")


def _line(r: dict) -> str:
    ratio = f"{r['ratio_vs_baseline']:.2f}x" if r.get("ratio_vs_baseline") else "-"
    return (f"{r['component']:<9} b={r['batch']:<4} {r['config']:<13} {r['images_per_s']:>9.1f} img/s  {ratio:>6}  "
            f"rel err {r['max_rel_err']:.1e}  peak {r['share_of_peak']:.0%}  build {r['build_s']:.0f}s")


def _device_line(doc: dict) -> str:
    d = doc["device"]
    if d["type"] == "cuda":
        return f"GPU: {d['name']} (compute capability {d['compute_capability']}, {d.get('memory_gib')} GiB)"
    return (f"CPU: {d['name']}; ISA {'/'.join(d.get('isa') or []) or '-'}; native bf16: {doc.get('cpu_native_bf16')}; "
            f"load average {doc.get('load_avg_start')}")


def _markdown(doc: dict) -> str:
    lines = [
        f"# Backends on {doc['device']['name']} ({doc['threads']} threads), preset `{doc['preset']}`", "",
        "matmul peak: " + ", ".join(f"{k} {v} GFLOP/s" for k, v in doc["matmul_peak_gflops"].items())
        + f" (fastest square torch matmul); torch {doc['versions']['torch']}, onnxruntime "
        f"{doc['versions'].get('onnxruntime')}, tensorrt {doc['versions'].get('tensorrt')}", "",
        _device_line(doc), "",
        f"`{doc['command']}`", "",
        f"| component | batch | backend | img/s | vs {doc.get('baseline', 'eager fp32')} | rel err | GFLOP/img | "
        "share of peak | build s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['component']} | {r['batch']} | {r['config']} | skipped: {r['skipped']} | | | | | |")
            continue
        ratio = f"{r['ratio_vs_baseline']:.2f}x" if r.get("ratio_vs_baseline") else "-"
        lines.append(f"| {r['component']} | {r['batch']} | {r['config']} | {r['images_per_s']:.1f} | {ratio} | "
                     f"{r['max_rel_err']:.1e} | {r['gflop_per_img']:.3f} | {r['share_of_peak']:.0%} | {r['build_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
