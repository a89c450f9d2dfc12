"""TensorRT engines from ONNX: build a serialized plan, run it with CUDA-graph replay per static bucket.

Written against the TensorRT 10 Python API (name-based tensor IO, `execute_async_v3`). TensorRT cannot be
installed on the development/CI machines: nothing here runs at import, `HAS_TENSORRT` says whether the
module exists, and `synthgen.export.backends.require("trt", device)` raises a clear error otherwise.

Build:
  ONNX parser -> network; one optimization profile per batch bucket (min = opt = max = bucket, so each
  profile is static and CUDA-graph capturable) or one dynamic profile (1, opt, max) without buckets;
  FP16 / BF16 builder flags with normalization, softmax and unary (exp/sin/cos/sqrt) layers and the
  timestep-embedding scope pinned to fp32; a timing cache file reused across builds.
Run:
  one execution context per profile, IO tensors are torch CUDA tensors bound by address; for static
  profiles the first call captures `execute_async_v3` into a torch.cuda.CUDAGraph and later calls copy
  inputs into the captured buffers and replay it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from synthgen.export.backends import HAS_TENSORRT, require
from synthgen.export.precision import TIMESTEP_SCOPES

WORKSPACE_BYTES = 8 << 30


def _trt():
    import tensorrt as trt

    return trt


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    input_shapes: dict[str, tuple[int, ...]],  # per-sample shape of each input (batch axis excluded)
    precision: str = "fp16",
    buckets: tuple[int, ...] = (),
    max_batch: int = 64,
    timing_cache: Path | None = None,
) -> Path:
    """Parse `onnx_path`, build an engine and write the serialized plan to `plan_path`."""
    require("trt", "cuda", precision)
    trt = _trt()
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_sensitive_layers(network)
    for lo, opt, hi in _profile_ranges(buckets, max_batch):
        profile = builder.create_optimization_profile()
        for name, shape in input_shapes.items():
            profile.set_shape(name, (lo, *shape), (opt, *shape), (hi, *shape))
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def _profile_ranges(buckets: tuple[int, ...], max_batch: int) -> list[tuple[int, int, int]]:
    if buckets:
        return [(b, b, b) for b in sorted(buckets)]
    return [(1, max_batch, max_batch)]


def _pin_sensitive_layers(network) -> None:
    """Keep normalizations, softmax, unary math and the timestep embedding in fp32 under FP16/BF16."""
    trt = _trt()
    sensitive = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.UNARY, trt.LayerType.REDUCE}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in sensitive or any(s in layer.name.lower() for s in TIMESTEP_SCOPES):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output_type(j) in (trt.float16, trt.bfloat16, trt.float32):
                    layer.set_output_type(j, trt.float32)


@dataclass
class _Slot:
    """One optimization profile's context, its bound IO buffers and (static profiles) its CUDA graph."""

    context: object
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class TrtBackend:
    engine: object
    device: torch.device
    dtype: torch.dtype
    buckets: tuple[int, ...]
    max_batch: int
    use_cuda_graphs: bool = True
    name: str = "trt"
    _slots: dict[int, _Slot] = field(default_factory=dict, repr=False)
    _stream: torch.cuda.Stream | None = field(default=None, repr=False)

    @classmethod
    def load(cls, plan_path: Path, device, dtype, buckets: tuple[int, ...], max_batch: int) -> "TrtBackend":
        require("trt", device)
        trt = _trt()
        engine = trt.Runtime(_logger()).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path}: rebuild it with 'synthgen build-engine'")
        return cls(engine, torch.device(device), dtype, tuple(buckets), max_batch)

    def _io(self) -> tuple[list[str], list[str]]:
        trt = _trt()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def _slot(self, batch: int) -> tuple[int, _Slot]:
        profile = sorted(self.buckets).index(batch) if self.buckets else 0
        if profile not in self._slots:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self._stream.cuda_stream)
            self._slots[profile] = _Slot(context)
        return profile, self._slots[profile]

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = inputs[0].shape[0]
        if self.buckets and batch not in self.buckets:
            raise ValueError(f"TensorRT engine has buckets {self.buckets}, got batch {batch}; use run_bucketed")
        _, slot = self._slot(batch)
        names_in, names_out = self._io()
        static = bool(self.buckets) and self.use_cuda_graphs
        if slot.graph is not None:
            for name, x in zip(names_in, inputs):
                slot.inputs[name].copy_(x)
            slot.graph.replay()
            return slot.output.clone()
        for name, x in zip(names_in, inputs):
            buf = x.detach().to(self.device, torch.float32).contiguous()
            slot.inputs[name] = buf
            slot.context.set_input_shape(name, tuple(buf.shape))
            slot.context.set_tensor_address(name, buf.data_ptr())
        out_shape = tuple(slot.context.get_tensor_shape(names_out[0]))
        slot.output = torch.empty(out_shape, device=self.device, dtype=torch.float32)
        slot.context.set_tensor_address(names_out[0], slot.output.data_ptr())
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if not slot.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        if static:
            # The first enqueue above flushed TensorRT's deferred shape work; now capture a replayable graph.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                slot.context.execute_async_v3(stream.cuda_stream)
            slot.graph = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return slot.output.clone()


__all__ = ["HAS_TENSORRT", "TrtBackend", "build_plan"]
