"""The engine folder's manifest.json: what was built, for which pack, where, and how far from eager it is.

```
ENGINE_DIR/
  manifest.json            format, pack hash, precision, device, versions, build time, per component:
                           backend, files, input shapes, buckets / max batch, error vs eager, timings
  denoiser.onnx            ort: exported graph (fp16: mixed precision)   denoiser.ort.onnx: ORT-optimized
  denoiser.b64.pt2         compile: one AOTInductor package per batch bucket
  denoiser.plan            trt: serialized TensorRT engine (+ timing.cache shared by builds)
```
`stale_reasons` compares a manifest with the current pack and machine; the engine side decides whether to
rebuild (the on-the-fly cache) or refuse (an explicit --engine folder).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT = "synthgen-engine/1"
MANIFEST = "manifest.json"
# Which library versions an artifact of each backend depends on (a change makes it stale).
VERSION_KEYS = {"eager": ("torch",), "compile": ("torch",), "ort": ("onnxruntime",), "trt": ("tensorrt",)}


@dataclass
class ComponentEntry:
    backend: str
    files: list[str]
    inputs: dict[str, list[int]]  # per-sample shapes (batch axis excluded)
    outputs: list[str]
    buckets: list[int]  # static batch sizes; [] = dynamic batch up to max_batch
    max_batch: int
    error: dict  # max_abs, max_rel (vs eager fp32 on fresh random inputs), tolerance, batch, finite
    build_seconds: float
    seconds_per_batch: float | None = None
    candidates: list[dict] = field(default_factory=list)  # `auto`: every backend tried, with error and time


@dataclass
class Manifest:
    pack_hash: str
    pack_name: str
    precision: str
    requested_backend: str
    device: dict
    versions: dict
    components: dict[str, ComponentEntry]
    built_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    build_seconds: float = 0.0
    format: str = FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        if d.get("format") != FORMAT:
            raise ValueError(f"manifest format {d.get('format')!r} is not {FORMAT!r}")
        d["components"] = {k: ComponentEntry(**v) for k, v in d["components"].items()}
        return cls(**d)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=1, sort_keys=True))
    tmp.replace(path)  # the manifest appears only once every artifact is on disk
    return path


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    return Manifest.from_dict(json.loads(path.read_text()))


# CPU instruction-set extensions that decide which machine code a CPU engine holds (Inductor and ONNX
# Runtime both specialise for the ISA they build on) and whether bf16 is native or emulated.
CPU_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                 "amx_tile", "amx_bf16", "amx_int8")
# Backends whose artifacts are machine code or hardware-specific graph layouts for the CPU they were built on.
CPU_SPECIFIC_BACKENDS = ("compile", "ort")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ('', set()) where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough: cores of one machine agree
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def cpu_isa() -> list[str]:
    """The CPU_ISA_FLAGS this CPU has, in that order (e.g. ['avx2', 'fma', 'avx512f', ...])."""
    flags = _cpuinfo()[1]
    return [f for f in CPU_ISA_FLAGS if f in flags]


def cpu_native_bf16() -> bool:
    """Whether bf16 matmuls have hardware support (AVX512-BF16 or AMX-BF16); without it torch emulates them
    and bf16 runs several times slower than fp32 (measured 3-5x on an AVX2-only core)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_isa()))


def device_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"type": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1)}
    model = _cpuinfo()[0]
    return {"type": "cpu", "name": model or platform.processor() or platform.machine(), "compute_capability": None,
            "threads": torch.get_num_threads(), "isa": cpu_isa(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist, key in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxruntime-gpu", "onnxruntime"),
                      ("tensorrt", "tensorrt"), ("synthgen", "synthgen")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out.setdefault(key, None)
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return out


def stale_reasons(manifest: Manifest, pack_hash: str, device: torch.device | str) -> list[str]:
    """Why the engine no longer fits this pack / machine; [] when it can be used as is."""
    reasons = []
    if manifest.pack_hash != pack_hash:
        reasons.append(f"it was built for pack {manifest.pack_hash}, the pack is now {pack_hash}")
    here, there = device_info(device), manifest.device
    if here["type"] != there.get("type") or (here["type"] == "cuda" and (
            here["name"] != there.get("name") or here["compute_capability"] != there.get("compute_capability"))):
        reasons.append(f"it was built on {there.get('type')} {there.get('name')!r}, this is {here['type']} "
                       f"{here['name']!r}")
    elif here["type"] == "cpu" and "isa" in there and set(there["isa"]) != set(here["isa"]) and any(
            c.backend in CPU_SPECIFIC_BACKENDS for c in manifest.components.values()):
        # Code built for AVX-512 dies with SIGILL on an AVX2 core; code built for AVX2 runs but slowly.
        reasons.append(f"it was built on a CPU with {'/'.join(there['isa']) or 'no listed ISA extensions'}, "
                       f"this CPU has {'/'.join(here['isa']) or 'none of them'}")
    versions = library_versions()
    for backend in sorted({c.backend for c in manifest.components.values()}):
        for key in VERSION_KEYS.get(backend, ()):
            if manifest.versions.get(key) != versions.get(key):
                reasons.append(f"{key} changed from {manifest.versions.get(key)} to {versions.get(key)}")
    return reasons
