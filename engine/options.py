"""The vocabularies of generate's options, in one place and free of heavy imports, so the command line
can build its help without loading torch. The modules that act on a choice import its tuple from here."""

from __future__ import annotations

FORMATS = ("jpg", "webp", "png")
# "auto": bf16 where the hardware computes it natively (a CPU with AVX-512 BF16 or AMX, a GPU with bf16),
# fp16 on older GPUs, fp32 otherwise (runtime.resolve_dtype); the run records the dtype it picked.
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("eager", "compile", "ort", "trt", "auto")
# Where the device stages run: "thread" = a device thread computes ahead while the calling thread decides
# and writes; "inline" = the calling thread computes each batch when it needs it. "auto" = thread on CUDA,
# inline on the CPU: there a second thread running torch starts a second OpenMP team on the same cores,
# and libgomp then throttles its spin-waits (bf16 at batch 8: inline 1.76x the thread; overlap.py).
OVERLAPS = ("auto", "thread", "inline")
EXECUTORS = ("local", "ray")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler")
MODES = ("reuse", "perturb", "interpolate")
BALANCES = ("class", "bank")
NULL_CHOICES = ("pack", "zeros", "mean")  # generate --null: the pack's own, or one the user names
IMAGE_ENCODERS = ("auto", "simplejpeg", "pillow", "nvjpeg")  # JPEG only; WebP and PNG always use Pillow
LOADERS = ("webdataset", "wids", "dali")  # train classifier --loader
PRESETS = ("tiny", "tiny-unet", "tiny-flow", "small", "paper")  # pack random --preset (presets.py builds them)
BUILTIN_SETS = ("digits", "mnist5k")  # builtin:NAME sources (sources.py), train default-pack / study --dataset
