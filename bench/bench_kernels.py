"""Benchmark the Triton kernels of synthgen.kernels against PyTorch's best equivalents, in one run.

    python bench/bench_kernels.py                 # on a GPU machine: full run, writes bench/results/
    python bench/bench_kernels.py --no-compile    # skip the torch.compile baselines (saves minutes)

For every op and shape: median time of our kernel and of each baseline (SDPA flash / efficient, the
unfused op sequence, torch.compile of it), the ratio baseline / ours (> 1: ours is faster), and the
achieved TFLOP/s (attention) or GB/s (the memory-bound fusions) against the card's peak measured in the
same run (a bf16 matmul and a device-to-device copy). Last, one DiT-B denoiser forward with and without
the kernels. Timings: CUDA events, warm-up, then the median of repeats. Byte and FLOP counts are closed form.

Without a GPU it runs the same harness at toy sizes under the Triton CPU interpreter as a sanity pass
(correctness is printed; the timings are meaningless) and writes nothing to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    # Must precede the first import of synthgen.kernels: @triton.jit reads it when the kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from synthgen.kernels import adaln, attention, filter as kfilter, guidance_step  # noqa: E402
from synthgen.export.timing import median_seconds  # noqa: E402
from synthgen.kernels import dispatch  # noqa: E402
from synthgen.models.dit import DIT_PRESETS, DiT, reinit_zero_params_  # noqa: E402
from synthgen.samplers import NoiseSchedule, make_plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- Timing ----


def median_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median time of fn in ms: CUDA events on a GPU (no host overhead between), wall time on the CPU."""
    return median_seconds(fn, device, warmup, repeats, events=True) * 1e3


def measure_peaks(device: str, args) -> dict:
    """bf16 matmul TFLOP/s and copy GB/s (read + write) of this device, measured now."""
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = median_ms(lambda: a @ b, device, args.warmup, args.repeats)
    numel = (1 << 28) if device == "cuda" else (1 << 20)  # 1 GiB of fp32 on a GPU: far beyond L2
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    cp = median_ms(lambda: dst.copy_(src), device, args.warmup, args.repeats)
    return {"bf16_matmul_tflops": 2 * n**3 / mm / 1e9, "copy_gbps": 2 * numel * 4 / cp / 1e6, "matmul_n": n}


# ---- Rows ----


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    ms: float | None
    vs_ours: float | None  # this impl's time / ours: > 1 means ours is faster
    rate: float | None  # TFLOP/s or GB/s achieved
    unit: str
    of_peak: float | None  # rate / measured peak
    max_err: float | None = None  # vs the float32 reference (ours only)
    note: str = ""


def run_case(op, shape, dtype, impls, work, unit, peak, device, args, check=None) -> list[Row]:
    """Time every impl (the first is ours); `work` is FLOPs (TFLOP/s) or bytes (GB/s) per call."""
    rows, ours_ms = [], None
    for name, fn in impls:
        try:
            ms = median_ms(fn, device, args.warmup, args.repeats)
        except Exception as exc:  # a baseline the backend refuses (e.g. flash on fp32) is a row, not a crash
            rows.append(Row(op, shape, dtype, name, None, None, None, unit, None, note=type(exc).__name__))
            continue
        ours_ms = ms if ours_ms is None else ours_ms
        rate = work / ms / (1e9 if unit == "TFLOP/s" else 1e6)  # per ms = 1e3 per s; T = 1e12, G = 1e9
        rows.append(Row(op, shape, dtype, name, ms, ms / ours_ms, rate, unit, rate / peak))
    if check is not None and rows and rows[0].ms is not None:
        rows[0].max_err = check()
    return rows


def _err(got, want) -> float:
    return (got.float() - want.float()).abs().nan_to_num(0.0).max().item()


def _maybe_compile(fn, args):
    return torch.compile(fn, dynamic=False) if args.compile else None


# ---- Cases ----


def bench_attention(device, dtype, peaks, args) -> list[Row]:
    shapes = args.attn_shapes
    rows = []
    for B, H, T, Dh in shapes:
        q, k, v = (torch.randn(B, H, T, Dh, device=device, dtype=dtype) for _ in range(3))

        def sdpa(backend):
            def fn():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            return fn

        def unfused():
            return (q @ k.transpose(-1, -2) * Dh**-0.5).softmax(-1) @ v

        impls = [
            ("triton (ours)", lambda: attention.attention_triton(q, k, v)),
            ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION)),
            ("sdpa efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)),
            ("unfused", unfused),
        ]
        compiled = _maybe_compile(unfused, args)
        if compiled is not None:
            impls.append(("torch.compile(unfused)", compiled))
        rows += run_case(
            "attention", f"B{B} H{H} T{T} Dh{Dh}", str(dtype), impls,
            attention.attention_flops(B, H, T, T, Dh), "TFLOP/s", peaks["bf16_matmul_tflops"], device, args,
            check=lambda: _err(attention.attention_triton(q, k, v), attention.attention_ref(q, k, v)),
        )  # fmt: skip
    return rows


def bench_adaln(device, dtype, peaks, args) -> list[Row]:
    rows = []
    for B, T, D in args.adaln_shapes:
        x = torch.randn(B, T, D, device=device, dtype=dtype)
        y = torch.randn_like(x)
        shift, scale, gate = torch.randn(B, 6 * D, device=device, dtype=dtype).chunk(6, dim=1)[:3]
        es = x.element_size()
        ln = lambda: adaln.layernorm_modulate_ref(x, shift, scale)  # noqa: E731
        gr = lambda: adaln.gated_residual_ref(x, gate, y)  # noqa: E731
        cases = [
            ("layernorm_modulate", lambda: adaln.layernorm_modulate_triton(x, shift, scale), ln, 2 * x.numel() * es,
             lambda: _err(adaln.layernorm_modulate_triton(x, shift, scale),
                          adaln.layernorm_modulate_ref(x.float(), shift.float(), scale.float()))),
            ("gated_residual", lambda: adaln.gated_residual_triton(x, gate, y), gr, 3 * x.numel() * es,
             lambda: _err(adaln.gated_residual_triton(x, gate, y),
                          adaln.gated_residual_ref(x.float(), gate.float(), y.float()))),
        ]  # fmt: skip
        for op, ours, ref, nbytes, check in cases:
            impls = [("triton (ours)", ours), ("unfused", ref)]
            compiled = _maybe_compile(ref, args)
            if compiled is not None:
                impls.append(("torch.compile(unfused)", compiled))
            rows += run_case(op, f"B{B} T{T} D{D}", str(dtype), impls, nbytes, "GB/s", peaks["copy_gbps"], device,
                             args, check=check)  # fmt: skip
    return rows


def bench_guided_step(device, peaks, args) -> list[Row]:
    # dpmpp_2m at a middle step uses every input but noise: reads x, cond, uncond, prev_x0; writes x_next, x0.
    plan = make_plan("dpmpp_2m", NoiseSchedule(), 25, device=device)
    rows = []
    for shape in args.step_shapes:
        x, cond, uncond, prev = (torch.randn(shape, device=device) for _ in range(4))
        args_ = (plan, 5, x, cond, uncond, 4.0, prev)
        ref = lambda: guidance_step.guided_step_ref(*args_)  # noqa: E731
        impls = [("triton (ours)", lambda: guidance_step.guided_step_triton(*args_)), ("unfused", ref)]
        compiled = _maybe_compile(ref, args)
        if compiled is not None:
            impls.append(("torch.compile(unfused)", compiled))
        rows += run_case(
            "guided_step", "x".join(map(str, shape)), "torch.float32", impls, 6 * x.numel() * 4, "GB/s",
            peaks["copy_gbps"], device, args,
            check=lambda: max(_err(a, b) for a, b in zip(guidance_step.guided_step_triton(*args_), ref())),
        )  # fmt: skip
    return rows


def bench_filter(device, dtype, peaks, args) -> list[Row]:
    rows = []
    for B, D in args.filter_shapes:
        emb, cond = torch.randn(B, D, device=device, dtype=dtype), torch.randn(B, D, device=device, dtype=dtype)
        ref = lambda: kfilter.cosine_filter_ref(emb, cond, 0.0)  # noqa: E731
        impls = [("triton (ours)", lambda: kfilter.cosine_filter_triton(emb, cond, 0.0)), ("unfused", ref)]
        compiled = _maybe_compile(ref, args)
        if compiled is not None:
            impls.append(("torch.compile(unfused)", compiled))
        rows += run_case(
            "cosine_filter", f"B{B} D{D}", str(dtype), impls, 2 * emb.numel() * emb.element_size(), "GB/s",
            peaks["copy_gbps"], device, args,
            check=lambda: _err(kfilter.cosine_filter_triton(emb, cond, 0.0)[0], ref()[0]),
        )  # fmt: skip
    return rows


def bench_dit(device, dtype, peaks, args) -> list[Row]:
    """One CFG-batched DiT forward with the kernels (dispatcher on) and without (plain torch, SDPA)."""
    cfg = DIT_PRESETS[args.dit_preset]
    # Random weights everywhere: a fresh adaLN-Zero DiT outputs exact zeros, which would hide any error.
    model = reinit_zero_params_(DiT(cfg), generator=torch.Generator().manual_seed(0))
    model = model.to(device=device, dtype=dtype).eval()
    B = args.dit_batch
    x = torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, dtype=dtype)
    t, c = torch.rand(B, device=device) * 1000, torch.randn(B, cfg.cond_dim, device=device, dtype=dtype)

    @torch.inference_mode()
    def with_kernels():
        with dispatch.triton_kernels(True):  # explicit, so the CPU sanity pass runs them too
            return model(x, t, c)

    @torch.inference_mode()
    def without():
        with dispatch.triton_kernels(False):
            return model(x, t, c)

    flops = model.flops_per_forward() * B
    return run_case(
        f"DiT-{args.dit_preset} forward", f"B{B} T{cfg.num_tokens} D{cfg.hidden_size}", str(dtype),
        [("with kernels", with_kernels), ("without (torch + SDPA)", without)],
        flops, "TFLOP/s", peaks["bf16_matmul_tflops"], device, args,
        check=lambda: _err(with_kernels(), without()),
    )  # fmt: skip


# ---- Report ----


def table(rows: list[Row]) -> str:
    # "vs ours": this row's time / our kernel's time, so > 1 means ours is faster.
    head = f"{'op':<22} {'shape':<24} {'dtype':<15} {'impl':<24} {'ms':>9} {'vs ours':>7} " + (
        f"{'rate':>16} {'peak':>6} {'err':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = f"{r.ms:9.4f}" if r.ms is not None else f"{'n/a':>9}"
        ratio = f"{r.vs_ours:7.2f}" if r.vs_ours is not None else f"{'':>7}"
        rate = f"{r.rate:9.4g} {r.unit:<6}" if r.rate is not None else f"{r.note:>16}"
        peak = f"{100 * r.of_peak:5.1f}%" if r.of_peak is not None else f"{'':>6}"
        err = f"{r.max_err:9.2e}" if r.max_err is not None else ""
        dtype = r.dtype.replace("torch.", "")
        lines.append(f"{r.op:<22} {r.shape:<24} {dtype:<15} {r.impl:<24} {ms} {ratio} {rate} {peak} {err}")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import triton

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def parse_args(gpu: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=10 if gpu else 1)
    p.add_argument("--repeats", type=int, default=50 if gpu else 2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile baselines")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (GPU runs only)")
    p.add_argument("--dit-preset", default="base" if gpu else "tiny", choices=sorted(DIT_PRESETS))
    p.add_argument("--dit-batch", type=int, default=64 if gpu else 2, help="rows per forward (2 x images with CFG)")
    args = p.parse_args()
    if not gpu:
        args.compile = False  # 10-16 s per cold compile on a CPU, for timings that mean nothing there
    # DiT shapes: DiT-B/2 at 256 px has T=256, D=768, 12 heads of 64; a batch of 32 images is 64 rows with CFG.
    args.attn_shapes = [(64, 12, 256, 64), (16, 12, 1024, 64), (16, 8, 1024, 128)] if gpu else [(1, 2, 40, 32)]
    args.adaln_shapes = [(64, 256, 768), (64, 1024, 1152)] if gpu else [(2, 17, 64)]
    args.step_shapes = [(256, 4, 32, 32), (64, 3, 256, 256)] if gpu else [(3, 4, 8, 8)]
    args.filter_shapes = [(256, 768), (4096, 1024)] if gpu else [(7, 33)]
    return args


def main() -> int:
    gpu = torch.cuda.is_available()
    args = parse_args(gpu)
    device = "cuda" if gpu else "cpu"
    if not gpu:
        print("No CUDA device: running a toy-size sanity pass under the Triton CPU interpreter.\n"
              "Timings below are meaningless; nothing is written to bench/results/.\n")  # fmt: skip
    peaks = measure_peaks(device, args)
    print(f"measured peak: bf16 matmul {peaks['bf16_matmul_tflops']:.1f} TFLOP/s, copy {peaks['copy_gbps']:.1f} GB/s\n")
    dtype = torch.bfloat16
    rows = bench_attention(device, dtype, peaks, args)
    if gpu:
        rows += bench_attention(device, torch.float16, peaks, args)
    rows += bench_adaln(device, dtype, peaks, args)
    rows += bench_guided_step(device, peaks, args)
    rows += bench_filter(device, dtype, peaks, args)
    rows += bench_dit(device, dtype, peaks, args)
    text = table(rows)
    print(text)
    if not gpu:
        return 0
    env = environment(device)
    stem = f"kernels_{env['device'].replace(' ', '-').lower()}_{env['date'][:10]}"
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "peaks": peaks, "rows": [asdict(r) for r in rows]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = "\n".join(f"{k}: {v}" for k, v in env.items())
    peak_line = f"peak: bf16 matmul {peaks['bf16_matmul_tflops']:.1f} TFLOP/s, copy {peaks['copy_gbps']:.1f} GB/s"
    (args.out / f"{stem}.txt").write_text(f"{header}\n{peak_line}\n\n{text}\n")
    print(f"\nwrote {args.out / stem}.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
