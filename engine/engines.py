"""Engine folders for a pack: build one (a backend per component: ORT, TensorRT or compiled), load it, and
stand its backends in for the pack's modules.

`synthgen.export` knows modules, ONNX files and runtimes; this file knows packs: which components there
are, what their inputs look like, and how `generate` calls them. Imports go one way (engine -> export).

  build_engine(pack, out, backend, precision, batch, buckets)  -> Manifest   (synthgen build-engine)
  load_backends(engine_dir, pack, device)                      -> {component: Backend}
  engine_components(pack, device, sizes, engine=..., backend=...) -> {component: BackendModule}
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from synthgen import locks
from synthgen.errors import UsageError
from synthgen.export.backends import (
    BACKENDS, PRECISIONS, TORCH_DTYPES, BackendUnavailable, CompiledBackend, EagerBackend, OrtBackend,
    aot_compile, output_error, run_bucketed, unavailable_reason,
)
from synthgen.export.timing import median_seconds
from synthgen.export.manifest import (
    MANIFEST, ComponentEntry, Manifest, device_info, library_versions, read_manifest, stale_reasons,
    write_manifest,
)
from synthgen.pack import Pack, PackConfig, load_pack
from synthgen.scheduler import BatchSizes

ENGINE_BACKENDS = (*BACKENDS, "auto")
COMPONENTS = ("denoiser", "vae", "encoder")
# Largest accepted max|y - y_eager_fp32| / max|y_eager_fp32| on fresh random inputs, per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
STATIC_BACKENDS = ("compile", "trt")  # built per batch bucket; the others take any batch
VALIDATION_BATCH = 4


@dataclass(frozen=True)
class ComponentIO:
    inputs: tuple[str, ...]
    output: str
    keep_dtype: tuple[int, ...] = ()  # inputs that stay float32 (the timestep, as the pipeline passes it)


COMPONENT_IO = {
    "denoiser": ComponentIO(("x", "t", "cond"), "out", keep_dtype=(1,)),
    "vae": ComponentIO(("latents",), "images"),
    "encoder": ComponentIO(("images",), "embedding"),
}


def input_shapes(config: PackConfig, component: str) -> dict[str, tuple[int, ...]]:
    """Per-sample input shapes (batch axis excluded) of a component, as generate calls it."""
    if component == "denoiser":
        return {"x": tuple(config.denoiser.sample_shape), "t": (), "cond": (config.denoiser.cond_dim,)}
    if component == "vae":
        return {"latents": tuple(config.denoiser.sample_shape)}
    return {"images": (3, config.image_size, config.image_size)}


def random_inputs(config: PackConfig, component: str, batch: int, seed: int, device) -> tuple[torch.Tensor, ...]:
    """Inputs in the ranges generate feeds: N(0,1) samples/conditions, t in [0, T), images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in input_shapes(config, component).items():
        if name == "t":
            x = torch.rand(batch, generator=g) * config.schedule.num_train_timesteps
        elif name == "images":
            x = torch.rand(batch, *shape, generator=g)
        else:
            x = torch.randn(batch, *shape, generator=g)
        out.append(x.to(device))
    return tuple(out)


def pack_components(pack: Pack) -> dict[str, nn.Module]:
    return {c: getattr(pack, c) for c in COMPONENTS if getattr(pack, c) is not None}


# ---- Building ------------------------------------------------------------------------------------------


def build_engine(
    pack_dir: str | Path,
    out: str | Path,
    backend: str = "ort",
    precision: str = "fp32",
    batch: int = 64,
    buckets: tuple[int, ...] = (),
    device: str | torch.device = "cpu",
    components: tuple[str, ...] = COMPONENTS,
    candidates: tuple[str, ...] | None = None,
    exporter: str = "auto",
    timing: bool = False,
    sizes: dict[str, tuple[int, ...]] | None = None,
) -> Manifest:
    """Build engines for the pack's components into `out` and write its manifest.json.

    `sizes`: per-component batch sizes (the static buckets; the largest is the component's batch) that
    override `batch` and `buckets` for the components it names: generate decodes and filters in chunks
    of their own size.

    Every component is validated against the eager fp32 module on fresh random inputs; an engine whose
    relative error exceeds TOLERANCE[precision] is refused. `auto` builds every available backend (or
    `candidates`), times each at `batch`, and keeps the fastest one within tolerance per component.
    """
    if backend not in ENGINE_BACKENDS:
        raise UsageError(f"--backend {backend!r} is not one of {', '.join(ENGINE_BACKENDS)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    buckets = tuple(sorted({int(b) for b in buckets}))
    if batch < 1 or any(b < 1 for b in buckets):
        raise UsageError(f"--batch and --batch-buckets must be positive, got {batch} and {buckets}")
    sizes = {c: tuple(sorted({int(b) for b in s})) for c, s in (sizes or {}).items()}
    if any(not s or s[0] < 1 for s in sizes.values()):
        raise UsageError(f"per-component batch sizes must be positive, got {sizes}")
    device = torch.device(device)
    if backend != "auto":
        _require(backend, device, precision)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-rebuilt folder must not look valid
    start = time.perf_counter()
    reference = load_pack(pack_dir, device=device, dtype=torch.float32)
    entries = {}
    for component, module in pack_components(reference).items():
        if component not in components:
            continue
        own = sizes.get(component)
        b, bs = (max(own), own) if own else (batch, buckets)
        if backend == "auto":
            entries[component] = _build_auto(reference, component, module, out, precision, b, bs, device,
                                              candidates, exporter)
        else:
            entries[component] = _build_one(reference, component, module, out, backend, precision, b, bs,
                                            device, exporter, timing)
            _check_tolerance(entries[component], component, backend, precision)
    manifest = Manifest(
        pack_hash=reference.hash, pack_name=reference.config.name, precision=precision, requested_backend=backend,
        device=device_info(device), versions=library_versions(), components=entries,
        build_seconds=round(time.perf_counter() - start, 2),
    )
    write_manifest(out, manifest)
    return manifest


def _require(backend: str, device: torch.device, precision: str) -> None:
    reason = unavailable_reason(backend, device, precision)
    if reason is not None:
        raise UsageError(f"backend {backend!r} is unavailable here: {reason}")


def _check_tolerance(entry: ComponentEntry, component: str, backend: str, precision: str) -> None:
    err = entry.error
    if not err["finite"] or err["max_rel"] > err["tolerance"]:
        raise UsageError(
            f"the {backend} {precision} {component} differs from eager fp32 by {err['max_rel']:.2e} (relative), "
            f"above the {precision} tolerance {err['tolerance']:.0e}; use --precision fp32 or another --backend"
        )


def _static_buckets(backend: str, batch: int, buckets: tuple[int, ...]) -> tuple[int, ...]:
    if buckets:
        return buckets
    return (batch,) if backend in STATIC_BACKENDS else ()


def _build_one(reference: Pack, component, module, out, backend, precision, batch, buckets, device, exporter,
               timing) -> ComponentEntry:
    io = COMPONENT_IO[component]
    static = _static_buckets(backend, batch, buckets)
    max_batch = max(static) if static else max(batch, *buckets) if buckets else batch
    start = time.perf_counter()
    files = _build_artifacts(reference.config, component, module, out, backend, precision, static, max_batch,
                             device, exporter)
    built = round(time.perf_counter() - start, 2)
    runner = _load_component(out, component, files, backend, precision, static, max_batch, module, device)
    check = random_inputs(reference.config, component, min(VALIDATION_BATCH, max_batch), seed=1234, device=device)
    with torch.inference_mode():
        error = output_error(module(*check), run_bucketed(runner, *check))
    error.update(tolerance=TOLERANCE[precision], batch=int(check[0].shape[0]), against="eager fp32")
    seconds = None
    if timing:
        bench = random_inputs(reference.config, component, batch, seed=99, device=device)
        with torch.inference_mode():
            seconds = round(median_seconds(lambda: run_bucketed(runner, *bench), device, warmup=1, repeats=2), 5)
    return ComponentEntry(
        backend=backend, files=files, inputs={k: list(v) for k, v in input_shapes(reference.config, component).items()},
        outputs=[io.output], buckets=list(static), max_batch=max_batch, error=error, build_seconds=built,
        seconds_per_batch=seconds,
    )


def _build_artifacts(config, component, module, out: Path, backend, precision, buckets, max_batch, device,
                     exporter) -> list[str]:
    """Write the component's artifacts into `out`; returns their file names."""
    io = COMPONENT_IO[component]
    if backend == "eager":
        return []
    if backend == "compile":
        low = _in_dtype(module, TORCH_DTYPES[precision])
        files = []
        for b in buckets:
            example = random_inputs(config, component, b, seed=0, device=device)
            example = tuple(x if i in io.keep_dtype else x.to(TORCH_DTYPES[precision]) for i, x in enumerate(example))
            files.append(aot_compile(low, example, out / f"{component}.b{b}.pt2").name)
        return files
    from synthgen.export.onnx_export import export_onnx

    example = random_inputs(config, component, 2, seed=0, device=device)
    onnx_path = export_onnx(module, example, out / f"{component}.onnx", list(io.inputs), [io.output],
                            dynamic_batch=True, exporter=exporter)
    if backend == "ort":
        if precision != "fp32":
            import onnx

            from synthgen.export.precision import convert_precision

            onnx.save(convert_precision(onnx.load(str(onnx_path)), precision), str(onnx_path))
        from synthgen.export.backends import ort_session

        optimized = out / f"{component}.ort.onnx"
        ort_session(onnx_path, device, optimized_path=optimized)
        return [onnx_path.name, optimized.name]
    from synthgen.export.trt import build_plan

    plan = build_plan(onnx_path, out / f"{component}.plan", input_shapes(config, component), precision,
                      buckets, max_batch, timing_cache=out / "timing.cache")
    return [onnx_path.name, plan.name]


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return module if next(module.parameters()).dtype == dtype else copy.deepcopy(module).to(dtype)


def _load_component(folder: Path, component, files, backend, precision, buckets, max_batch, module, device):
    """A Backend for one component from its artifacts; `module` is the fp32 eager module of the pack."""
    io, dtype, device = COMPONENT_IO[component], TORCH_DTYPES[precision], torch.device(device)
    try:
        if backend == "eager":
            return EagerBackend(_in_dtype(module, dtype), io.keep_dtype, max_batch=max_batch)
        if backend == "compile":
            paths = {b: folder / f for b, f in zip(buckets, files)}
            return CompiledBackend.from_packages(paths, device, dtype, io.keep_dtype)
        if backend == "ort":
            preoptimized = folder / files[1]
            return OrtBackend.load(preoptimized, device, dtype, max_batch, preoptimized=True)
        from synthgen.export.trt import TrtBackend

        return TrtBackend.load(folder / files[1], device, dtype, tuple(buckets), max_batch)
    except BackendUnavailable as e:
        raise UsageError(str(e)) from e


def _build_auto(reference, component, module, out, precision, batch, buckets, device, candidates,
                exporter) -> ComponentEntry:
    """Build each available backend in a scratch folder, keep the fastest within tolerance."""
    names = [b for b in (candidates or BACKENDS) if unavailable_reason(b, device, precision) is None]
    tried, best = [], None
    for name in names:
        scratch = out / ".auto" / name
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            entry = _build_one(reference, component, module, scratch, name, precision, batch, buckets, device,
                               exporter, timing=True)
        except (RuntimeError, ValueError) as e:  # a backend that fails to build here is a candidate lost
            tried.append({"backend": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        ok = entry.error["finite"] and entry.error["max_rel"] <= entry.error["tolerance"]
        tried.append({"backend": name, "max_rel": entry.error["max_rel"], "within_tolerance": ok,
                      "seconds_per_batch": entry.seconds_per_batch})
        if ok and (best is None or entry.seconds_per_batch < best[1].seconds_per_batch):
            best = (scratch, entry)
    if best is None:
        raise UsageError(f"auto: no backend built a {precision} {component} within tolerance: {tried}")
    scratch, entry = best
    for f in entry.files:
        shutil.move(str(scratch / f), str(out / f))
    shutil.rmtree(out / ".auto", ignore_errors=True)
    entry.candidates = tried
    return entry


# ---- Loading ------------------------------------------------------------------------------------------


def load_backends(engine_dir: str | Path, pack: Pack, device, rebuild_hint: str = "") -> dict[str, object]:
    """Backends for every component in the engine folder; refuses a stale or foreign folder."""
    engine_dir = Path(engine_dir)
    if not (engine_dir / MANIFEST).is_file():
        raise UsageError(f"{engine_dir} is not an engine folder (no {MANIFEST}); build one with "
                         f"'synthgen build-engine --pack {pack.root} --backend ort --out {engine_dir}'")
    try:
        manifest = read_manifest(engine_dir)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{engine_dir}/{MANIFEST} is unreadable ({e}); rebuild the engine") from e
    reasons = stale_reasons(manifest, pack.hash, device)
    if reasons:
        raise UsageError(f"engine {engine_dir} is stale: {'; '.join(reasons)}. Rebuild it with 'synthgen "
                         f"build-engine --pack {pack.root} --backend {manifest.requested_backend} --precision "
                         f"{manifest.precision} --out {engine_dir}'{rebuild_hint}")
    reference = pack_components(pack)
    out = {}
    for component, entry in manifest.components.items():
        if component not in reference:
            continue
        module = reference[component]
        out[component] = _load_component(engine_dir, component, entry.files, entry.backend, manifest.precision,
                                          tuple(entry.buckets), entry.max_batch, module, device)
    return out


class BackendModule:
    """A backend in the call signature of the module it replaces; other attributes come from that module.

    Inputs may arrive in the pack dtype; the output is returned in the dtype of the first input, as the
    eager module would return it, so the pipeline cannot tell the difference.
    """

    def __init__(self, backend, eager: nn.Module):
        self.backend = backend
        self.eager = eager

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = run_bucketed(self.backend, *inputs)
        return out.to(device=inputs[0].device, dtype=inputs[0].dtype)

    forward = __call__

    def __getattr__(self, name: str):
        # Only reached for attributes this wrapper lacks: preprocess/embed/spec, encode, kind, ...
        return getattr(self.__dict__["eager"], name)


def engine_sizes(sizes: BatchSizes, guidance: float) -> dict[str, tuple[int, ...]]:
    """The batch sizes generate calls each component with, as static engine buckets.

    Classifier-free guidance stacks cond and uncond rows into one denoiser call: twice the rows per
    chunk, plus the plain size so that a short tail chunk need not be padded to the full one. The VAE
    and the filter encoder see one row per image, in chunks of their own size.
    """
    denoise = (sizes.denoise, 2 * sizes.denoise) if guidance != 1.0 else (sizes.denoise,)
    return {"denoiser": denoise, "vae": (sizes.decode,), "encoder": (sizes.filter,)}


def engine_cache_dir(pack: Pack, backend: str, precision: str, device: torch.device, sizes: BatchSizes,
                     guidance: float) -> Path:
    """Where `generate --backend X` keeps engines it builds: PACK/.engines/... or $SYNTHGEN_ENGINE_CACHE/HASH/..."""
    base = os.environ.get("SYNTHGEN_ENGINE_CACHE")
    root = Path(base) / pack.hash if base else Path(pack.root) / ".engines"
    own = "".join(f"-{tag}{n}" for tag, n in (("d", sizes.decode), ("f", sizes.filter)) if n != sizes.denoise)
    return root / f"{backend}-{precision}-{device.type}-b{sizes.denoise}{own}{'-cfg' if guidance != 1.0 else ''}"


def engine_components(pack: Pack, device, sizes: BatchSizes, engine: Path | None = None, backend: str = "eager",
                      precision: str = "fp32", guidance: float = 1.0) -> dict[str, BackendModule]:
    """component -> a backend-backed callable standing in for the pack's module ({} for eager); the pack
    itself is left as it is.

    `engine`: an existing folder (refused when stale). Otherwise a non-eager `backend` builds into the
    cache folder on first use, at the stage sizes of `sizes` (engine_sizes), and rebuilds there when the
    pack, the libraries or the device changed. The build holds a lock beside the cache folder, so of two
    runs starting together one builds and the other then finds the engine fresh.
    """
    device = torch.device(device)
    if engine is None and backend == "eager":
        return {}
    if engine is None:
        engine = engine_cache_dir(pack, backend, precision, device, sizes, guidance)
        engine.parent.mkdir(parents=True, exist_ok=True)
        with locks.held(engine.parent / f"{engine.name}.lock"):
            if not _fresh(engine, pack, device):
                build_engine(pack.root, engine, backend, precision, batch=sizes.denoise, device=device,
                             sizes=engine_sizes(sizes, guidance))
    return {component: BackendModule(runner, getattr(pack, component))
            for component, runner in load_backends(engine, pack, device).items()}


def _fresh(engine: Path, pack: Pack, device: torch.device) -> bool:
    return (engine / MANIFEST).is_file() and not stale_reasons(read_manifest(engine), pack.hash, device)
