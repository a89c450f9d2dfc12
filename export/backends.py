"""Inference backends behind one small interface: `run(*inputs) -> output`, plus device, dtype and batch limits.

  eager    the PyTorch module itself (the reference every engine is validated against)
  compile  AOTInductor packages (one per static batch bucket, load in ~0.1 s) or in-process torch.compile
  ort      ONNX Runtime: TensorRT EP / CUDA EP on a GPU build (IO binding), else the CPU EP
  trt      TensorRT plans (see `synthgen.export.trt`)

Inputs and outputs are torch tensors. A backend casts inputs to its compute dtype (except the indices in
`keep_dtype`, e.g. the timestep) and returns the output as it computed it; `run_bucketed` splits a batch
into chunks the backend accepts and pads each to a bucket, dropping the padded rows afterwards.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

BACKENDS = ("eager", "compile", "ort", "trt")
PRECISIONS = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message names what is missing and the alternatives."""


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype  # compute dtype
    buckets: tuple[int, ...]  # static batch sizes it was built for; () = any batch up to max_batch
    max_batch: int

    def run(self, *inputs: torch.Tensor) -> torch.Tensor: ...


# ---- Capability checks ----------------------------------------------------------------------------


def unavailable_reason(backend: str, device: torch.device | str, precision: str = "fp32") -> str | None:
    """Why `backend` cannot run on `device` at `precision` here, or None when it can."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"backend {backend!r} is not one of {', '.join(BACKENDS)}"
    if precision not in PRECISIONS:
        return f"precision {precision!r} is not one of {', '.join(PRECISIONS)}"
    if backend == "ort":
        if not (HAS_ORT and HAS_ONNX):
            return "ONNX Runtime is not installed (pip install 'synthgen[export]'); use --backend compile or eager"
        if precision == "bf16":
            return ("ONNX Runtime has no bf16 Conv/MatMul kernels for opset-17 graphs; use --precision fp16 with "
                    "ort, or --backend compile/eager with bf16 (fast on AVX-512-BF16 CPUs)")
    if backend == "trt":
        missing = []
        if not HAS_TENSORRT:
            missing.append("TensorRT is not installed (pip install tensorrt)")
        if device.type != "cuda" or not torch.cuda.is_available():
            missing.append("it needs a CUDA GPU")
        if missing:
            return " and ".join(missing) + "; use --backend ort or compile"
    return None


def require(backend: str, device: torch.device | str, precision: str = "fp32") -> None:
    reason = unavailable_reason(backend, device, precision)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")


# ---- eager ------------------------------------------------------------------------------------------


def _cast_inputs(inputs, dtype: torch.dtype, device: torch.device, keep: tuple[int, ...]):
    return tuple(
        x.to(device=device) if (i in keep or not x.is_floating_point()) else x.to(device=device, dtype=dtype)
        for i, x in enumerate(inputs)
    )


@dataclass
class EagerBackend:
    module: nn.Module
    keep_dtype: tuple[int, ...] = ()
    max_batch: int = 1 << 16
    buckets: tuple[int, ...] = ()
    name: str = "eager"

    def __post_init__(self):
        p = next(self.module.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.inference_mode()
    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*_cast_inputs(inputs, self.dtype, self.device, self.keep_dtype))


# ---- compile ------------------------------------------------------------------------------------------


def aot_compile(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    """torch.export + AOTInductor into one .pt2 package for exactly these input shapes."""
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(module, example_inputs)
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


@dataclass
class CompiledBackend:
    """Static-shape compiled callables, one per bucket: AOTInductor packages or torch.compile graphs."""

    callables: dict[int, Callable]
    device: torch.device
    dtype: torch.dtype
    keep_dtype: tuple[int, ...] = ()
    name: str = "compile"

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.callables))

    @property
    def max_batch(self) -> int:
        return max(self.callables)

    @classmethod
    def from_packages(cls, paths: dict[int, Path], device, dtype, keep_dtype=()) -> "CompiledBackend":
        fns = {b: torch._inductor.aoti_load_package(str(p)) for b, p in paths.items()}
        return cls(fns, torch.device(device), dtype, keep_dtype)

    @classmethod
    def in_process(cls, module: nn.Module, buckets, keep_dtype=()) -> "CompiledBackend":
        """torch.compile once; every bucket shares the compiled module (static shapes, one graph each)."""
        p = next(module.parameters())
        compiled = torch.compile(module, dynamic=False)
        return cls({int(b): compiled for b in buckets}, p.device, p.dtype, keep_dtype)

    @torch.inference_mode()
    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = inputs[0].shape[0]
        if n not in self.callables:
            raise ValueError(f"compiled backend has buckets {self.buckets}, got batch {n}; use run_bucketed")
        out = self.callables[n](*_cast_inputs(inputs, self.dtype, self.device, self.keep_dtype))
        return out[0] if isinstance(out, (list, tuple)) else out


# ---- ort ----------------------------------------------------------------------------------------------


def ort_providers(device: torch.device) -> list:
    """Best execution providers available for `device`, in preference order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        index = device.index or 0
        wanted = [("TensorrtExecutionProvider", {"device_id": index, "trt_fp16_enable": True}),
                  ("CUDAExecutionProvider", {"device_id": index})]
        chosen = [p for p in wanted if p[0] in available]
        if not chosen:
            raise BackendUnavailable(
                "this onnxruntime build has no CUDA execution provider (pip install onnxruntime-gpu "
                "instead of onnxruntime); use --device cpu or --backend compile"
            )
        return [*chosen, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(model_path: Path, device: torch.device, optimized_path: Path | None = None,
                threads: int | None = None):
    """An InferenceSession. With `optimized_path` the fully optimized graph is written there (build time);
    loading that file later skips graph optimization (`preoptimized=True` in `OrtBackend.load`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=ort_providers(device))


@dataclass
class OrtBackend:
    session: object
    device: torch.device
    dtype: torch.dtype  # compute dtype inside the graph; IO is float32
    max_batch: int = 1 << 16
    buckets: tuple[int, ...] = ()
    name: str = "ort"
    _names: tuple[list[str], list[str]] = field(init=False, repr=False)

    def __post_init__(self):
        self._names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])

    @classmethod
    def load(cls, path: Path, device, dtype, max_batch: int, preoptimized: bool = False) -> "OrtBackend":
        import onnxruntime as ort

        device = torch.device(device)
        opts = ort.SessionOptions()
        # A file saved through optimized_model_filepath is already optimized for this EP and machine.
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if preoptimized
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(device))
        return cls(session, device, dtype, max_batch)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        names_in, names_out = self._names
        if self.device.type == "cuda":
            return self._run_bound(inputs, names_in, names_out[0])
        feeds = {n: x.detach().to("cpu", torch.float32).contiguous().numpy() for n, x in zip(names_in, inputs)}
        return torch.from_numpy(self.session.run(names_out[:1], feeds)[0])

    def _run_bound(self, inputs, names_in, name_out) -> torch.Tensor:
        """IO binding: ORT reads and writes torch's CUDA buffers directly, no host round trip."""
        import numpy as np

        binding = self.session.io_binding()
        keep = [x.detach().to(self.device, torch.float32).contiguous() for x in inputs]
        for name, x in zip(names_in, keep):
            binding.bind_input(name, "cuda", self.device.index or 0, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(name_out, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()[0]
        return torch.from_dlpack(out.to_dlpack()) if hasattr(out, "to_dlpack") else torch.from_numpy(out.numpy())


# ---- Batching, error, timing --------------------------------------------------------------------------


def run_bucketed(backend: Backend, *inputs: torch.Tensor) -> torch.Tensor:
    """Run any batch size: chunks of at most max_batch, each padded up to the smallest fitting bucket.

    Padding repeats the chunk's last row (a real input, so no NaN paths); padded rows are dropped.
    """
    n = inputs[0].shape[0]
    top = backend.max_batch if not backend.buckets else max(backend.buckets)
    outs = []
    for start in range(0, n, top):
        chunk = [x[start : start + top] for x in inputs]
        m = chunk[0].shape[0]
        size = next((b for b in sorted(backend.buckets) if b >= m), m) if backend.buckets else m
        if size > m:
            chunk = [torch.cat([x, x[-1:].expand(size - m, *x.shape[1:])]) for x in chunk]
        outs.append(backend.run(*chunk)[:m])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def output_error(reference: torch.Tensor, output: torch.Tensor) -> dict:
    """max |y - y_ref| and the relative error max |y - y_ref| / max |y_ref| (scale-aware, finite at zeros)."""
    ref, out = reference.detach().float().cpu(), output.detach().float().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    max_abs = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs,
            "finite": bool(torch.isfinite(out).all())}
