#!/usr/bin/env bash
# The GPU checks as prepared device calls: GPU tests, then the kernel, backend and end-to-end benchmarks.
# Sized for a 15-minute device budget: two calls of at most ~6 minutes, every step under its own timeout,
# a failed step never stops the next, and everything lands in ONE tarball under $OUT (the device tool
# returns at most 8 files).
#
#   here, once (any machine with pip access to the registry):
#       bash bench/gpu_session.sh fetch            # wheels the device image lacks -> .whl/ (git-ignored)
#   there, through the device tool, back to back (the machine stays warm ~30 s between calls):
#       run(command="bash bench/gpu_session.sh tests", carry=[".whl"], timeout_s=480)   # steps <= 420 s
#       run(command="bash bench/gpu_session.sh bench", carry=[".whl"], timeout_s=480)   # steps <= 420 s
#   here, afterwards: untar each gpu_<phase>.tar.gz into bench/results/gpu/ and commit it with the card named.
#
# The device image (see the library's device/KINDS.md) has python3.12 with torch, triton, timm, typer, onnx,
# onnxruntime (CPU build), scikit-learn and pytest, but not diffusers, webdataset or simplejpeg; TensorRT
# and onnxruntime-gpu cannot travel (no wheel here under the 64 MiB limit), so trt and the ORT CUDA provider
# show up as "skipped" rows with their reason.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-}"
WHEELS=(diffusers==0.42.1 importlib_metadata webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0)

fetch() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
  ls -la .whl
}

setup() {
  OUTDIR="${OUT:?run this phase through the device tool, which sets OUT}/gpu_${phase}"
  mkdir -p "$OUTDIR"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . \
    || { echo "install failed" | tee "$OUTDIR/FAILED"; pack_out; exit 1; }
  export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
  { nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
    python3 -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('triton', triton.__version__)";
    git rev-parse HEAD 2>/dev/null; date -u; } > "$OUTDIR/env.txt" 2>&1
}

step() {  # step NAME SECONDS CMD...: run under a timeout, log to $OUTDIR/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUTDIR/steps.txt"
}

pack_out() { tar -czf "$OUT/gpu_${phase}.tar.gz" -C "$OUT" "gpu_${phase}" && rm -rf "$OUT/gpu_${phase}"; }

case "$phase" in
  fetch) fetch ;;
  tests)
    setup
    # Every kernel against its reference on the GPU (no interpreter there), the CUDA dispatcher paths,
    # the DiT and the encoders through the kernels, engines (TensorRT tests skip without TensorRT).
    step kernel_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py \
      tests/test_kernels_adaln.py tests/test_kernels_guidance_step.py tests/test_kernels_filter.py \
      tests/test_kernels_dispatch.py tests/test_kernels_encoder.py tests/test_dit.py tests/test_samplers.py
    step export_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_export.py
    # generate on the GPU with the shipped pack (fp16, nvJPEG), read back by webdataset, twice for determinism.
    # Bitwise equality across batch sizes is not promised on a GPU: the comparison is reported, not required.
    step generate_cuda 60 bash -c 'synthgen generate --n 2000 --out /tmp/run_a --device cuda --dtype fp16 \
      --batch 256 --no-progress && synthgen verify /tmp/run_a && synthgen generate --n 2000 --out /tmp/run_b \
      --device cuda --dtype fp16 --batch 64 --no-progress && cat /tmp/run_a/000000.stats.json && \
      if cmp -s /tmp/run_a/000001.tar /tmp/run_b/000001.tar; then echo "batch 256 and 64: identical shards"; \
      else echo "batch 256 and 64: shards differ (allowed on a GPU)"; fi'
    step kernels_bench 180 python3 bench/bench_kernels.py --out "$OUTDIR"
    pack_out ;;
  bench)
    setup
    step backends_small 120 python3 bench/bench_backends.py --device cuda --preset small --batches 8,64 \
      --configs "eager fp32,eager fp16,eager bf16,compile fp16,compile bf16,ort fp16,trt fp16" \
      --compile-batches 64 --baseline "eager fp16" --out "$OUTDIR/backends_cuda_small.json"
    step bench_paper 300 synthgen bench --preset paper --device cuda --dtype fp16 --steps 1,4,25 --batch 32 \
      --n 128 --repeats 5 --json "$OUTDIR/bench_cuda_paper.json" --md "$OUTDIR/bench_cuda_paper.md"
    pack_out ;;
  *) echo "usage: bash bench/gpu_session.sh fetch|tests|bench" >&2; exit 2 ;;
esac
