"""Engines: ONNX export + ONNX Runtime match eager, precision conversion, buckets, manifest staleness, CLI errors.

Tolerances (relative error max|y - y_eager| / max|y_eager| on fresh random inputs): fp32 1e-4, fp16 1e-2,
bf16 5e-2 (synthgen.engines.TOLERANCE). The compile backend (AOTInductor, ~20-50 s per bucket on two
cores) runs only with SYNTHGEN_SLOW_TESTS=1; TensorRT tests run only where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from synthgen.config import GenerateConfig  # noqa: E402
from synthgen.engines import (  # noqa: E402
    TOLERANCE, build_engine, load_backends, random_inputs,
)
from synthgen.errors import UsageError  # noqa: E402
from synthgen.export.backends import (  # noqa: E402
    HAS_TENSORRT, EagerBackend, output_error, run_bucketed, unavailable_reason,
)
from synthgen.export.manifest import cpu_isa, read_manifest, write_manifest  # noqa: E402
from synthgen.export.precision import convert_precision  # noqa: E402
from synthgen.pack import load_pack  # noqa: E402
from synthgen.render import render_batch  # noqa: E402
from synthgen.runtime import load_runtime  # noqa: E402
from synthgen.presets import write_random_pack  # noqa: E402

SLOW = os.environ.get("SYNTHGEN_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def packs(tmp_path_factory, tiny_pack):
    root = tmp_path_factory.mktemp("export-packs")
    out = {"tiny": tiny_pack}
    for name in ("tiny-unet", "tiny-flow", "small"):
        write_random_pack(name, root / name, seed=0)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def ort_engines(packs, tmp_path_factory):
    """fp32 ORT engines (dynamic batch) for every component of the tiny presets, built once."""
    root = tmp_path_factory.mktemp("engines")
    return {name: (build_engine(packs[name], root / name, "ort", "fp32", batch=4), root / name)
            for name in ("tiny", "tiny-unet", "tiny-flow")}


def _compare(pack_dir, engine_dir, batch, seed=7):
    pack = load_pack(pack_dir)
    backends = load_backends(engine_dir, pack, "cpu")
    errors = {}
    for component, backend in backends.items():
        module = getattr(pack, component)
        inputs = random_inputs(pack.config, component, batch, seed, "cpu")
        with torch.inference_mode():
            errors[component] = output_error(module(*inputs), run_bucketed(backend, *inputs))
    return errors


@pytest.mark.parametrize("preset", ["tiny", "tiny-unet", "tiny-flow"])
def test_ort_fp32_matches_eager_every_component(ort_engines, packs, preset):
    manifest, folder = ort_engines[preset]
    expected = {"denoiser", "encoder"} | ({"vae"} if preset != "tiny" else set())
    assert set(manifest.components) == expected
    for entry in manifest.components.values():
        assert entry.error["max_rel"] < TOLERANCE["fp32"] and entry.error["finite"]
        assert (folder / entry.files[0]).is_file() and (folder / entry.files[1]).is_file()
    # Dynamic batch: sizes the engine was never exported or validated at.
    for batch in (1, 7):
        for component, err in _compare(packs[preset], folder, batch).items():
            assert err["max_rel"] < 1e-4, (preset, component, batch, err)


def test_onnx_files_have_named_io_and_pass_checker(ort_engines):
    _, folder = ort_engines["tiny-unet"]
    for component, ins, out in (("denoiser", ["x", "t", "cond"], "out"), ("vae", ["latents"], "images"),
                                ("encoder", ["images"], "embedding")):
        model = onnx.load(str(folder / f"{component}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}] == ins
        assert [o.name for o in model.graph.output] == [out]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis


def test_export_simplifies_the_traced_graph_without_changing_outputs(packs, tmp_path):
    import onnxruntime as ort

    from synthgen.export.onnx_export import export_onnx

    pack = load_pack(packs["tiny-unet"])
    example = random_inputs(pack.config, "denoiser", 2, 0, "cpu")
    paths = {flag: export_onnx(pack.denoiser, example, tmp_path / f"d{flag}.onnx", ["x", "t", "cond"], ["out"],
                               exporter="torchscript", simplify_graph=flag) for flag in (False, True)}
    nodes = {flag: len(onnx.load(str(p)).graph.node) for flag, p in paths.items()}
    assert nodes[True] < 0.8 * nodes[False], nodes
    feeds = {n: x.numpy() for n, x in zip(("x", "t", "cond"), random_inputs(pack.config, "denoiser", 3, 5, "cpu"))}
    raw, simple = (ort.InferenceSession(str(paths[f])).run(None, feeds)[0] for f in (False, True))
    np.testing.assert_array_equal(raw, simple)


def test_small_denoiser_ort_fp32(packs, tmp_path):
    manifest = build_engine(packs["small"], tmp_path / "e", "ort", "fp32", batch=2, components=("denoiser",))
    assert list(manifest.components) == ["denoiser"]
    assert manifest.components["denoiser"].error["max_rel"] < TOLERANCE["fp32"]


def test_fp16_mixed_precision_keeps_sensitive_ops_fp32(ort_engines, packs, tmp_path):
    _, folder = ort_engines["tiny-unet"]
    low = convert_precision(onnx.load(str(folder / "denoiser.onnx")), "fp16")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*low.graph.value_info, *low.graph.input]}
    types.update({i.name: i.data_type for i in low.graph.initializer})
    checked = 0
    for node in low.graph.node:
        if node.op_type in ("LayerNormalization", "InstanceNormalization", "Softmax", "Sin", "Cos"):
            assert all(types.get(x, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for x in node.input if x), node
            checked += 1
    assert checked >= 5
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in low.graph.initializer)  # weights stored low
    assert [i.type.tensor_type.elem_type for i in low.graph.input] == [onnx.TensorProto.FLOAT] * 3
    manifest = build_engine(packs["tiny-unet"], tmp_path / "fp16", "ort", "fp16", batch=4)
    for entry in manifest.components.values():
        assert 0 < entry.error["max_rel"] < TOLERANCE["fp16"]


def test_bf16_eager_within_tolerance(packs, tmp_path):
    manifest = build_engine(packs["tiny"], tmp_path / "bf16", "eager", "bf16", batch=4)
    for entry in manifest.components.values():
        assert 0 < entry.error["max_rel"] < TOLERANCE["bf16"]


def test_buckets_pad_and_split_to_the_same_rows(packs):
    pack = load_pack(packs["tiny"])
    backend = EagerBackend(pack.denoiser, keep_dtype=(1,), buckets=(2, 8))
    calls = []
    run = backend.run
    backend.run = lambda *xs: (calls.append(xs[0].shape[0]), run(*xs))[1]
    for batch in (1, 2, 3, 8, 11):
        inputs = random_inputs(pack.config, "denoiser", batch, seed=batch, device="cpu")
        with torch.inference_mode():
            torch.testing.assert_close(run_bucketed(backend, *inputs), pack.denoiser(*inputs), atol=1e-5, rtol=1e-5)
    assert set(calls) == {2, 8}  # every call ran at a bucket size


def test_generate_through_ort_matches_eager(ort_engines, gen_kwargs):
    _, folder = ort_engines["tiny"]
    kwargs = {**gen_kwargs, "guidance": 2.0}  # guidance: the denoiser sees cond and uncond as one 2B batch
    ids = np.arange(40, 46)
    eager = render_batch(load_runtime(GenerateConfig(**kwargs)), ids, keep_pixels=True)
    ort = render_batch(load_runtime(GenerateConfig(**kwargs, engine=folder)), ids, keep_pixels=True)
    torch.testing.assert_close(ort.pixels, eager.pixels, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ort.scores, eager.scores, atol=1e-3)
    assert np.abs(ort.images.astype(int) - eager.images.astype(int)).max() <= 1
    assert eager.pixels.std() > 0.01


def test_engine_and_backend_are_execution_fields(gen_kwargs, tmp_path):
    a = GenerateConfig(**gen_kwargs)
    b = GenerateConfig(**gen_kwargs, backend="ort")
    assert a.identity() == b.identity()
    with pytest.raises(UsageError, match="not both"):
        GenerateConfig(**gen_kwargs, backend="ort", engine=tmp_path)


def test_manifest_detects_changed_pack_and_versions(tiny_pack, tmp_path):
    pack_dir = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack_dir, ignore=shutil.ignore_patterns(".engines"))
    engine = tmp_path / "engine"
    manifest = build_engine(pack_dir, engine, "eager", "fp32", batch=2)
    assert manifest.pack_hash == load_pack(pack_dir).hash
    assert set(read_manifest(engine).device) >= {"type", "name", "compute_capability"}
    load_backends(engine, load_pack(pack_dir), "cpu")  # fresh: loads
    doc = json.loads((pack_dir / "pack.json").read_text())
    doc["description"] += " (edited)"
    (pack_dir / "pack.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="stale: it was built for pack"):
        load_backends(engine, load_pack(pack_dir), "cpu")
    manifest.pack_hash = load_pack(pack_dir).hash
    manifest.versions["torch"] = "0.0.1"
    write_manifest(engine, manifest)
    with pytest.raises(UsageError, match="torch changed from 0.0.1"):
        load_backends(engine, load_pack(pack_dir), "cpu")


def test_manifest_detects_another_cpu_isa_for_cpu_specific_backends(ort_engines, tiny_pack, tmp_path):
    _, built = ort_engines["tiny"]
    engine = tmp_path / "ort"
    shutil.copytree(built, engine)
    manifest = read_manifest(engine)
    assert manifest.device["isa"] == cpu_isa() and "torch_cpu_capability" in manifest.device
    load_backends(engine, load_pack(tiny_pack), "cpu")  # built here: loads
    # As if built on an AVX2-only core (or, seen from one, on an AVX-512 core whose code would not run).
    manifest.device["isa"] = ["avx2", "fma"] if "avx512f" in cpu_isa() else [*cpu_isa(), "avx512f"]
    write_manifest(engine, manifest)
    with pytest.raises(UsageError, match="built on a CPU with .*this CPU has"):
        load_backends(engine, load_pack(tiny_pack), "cpu")
    # Eager engines hold no machine code: a manifest from another CPU still loads.
    eager = build_engine(tiny_pack, tmp_path / "eager", "eager", "fp32", batch=2)
    eager.device["isa"] = manifest.device["isa"]
    write_manifest(tmp_path / "eager", eager)
    load_backends(tmp_path / "eager", load_pack(tiny_pack), "cpu")


def test_on_the_fly_backend_builds_into_cache_and_reuses_it(gen_kwargs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_ENGINE_CACHE", str(tmp_path / "cache"))
    rt = load_runtime(GenerateConfig(**{**gen_kwargs, "dtype": "bf16"}, backend="eager"))  # eager: no rt at all
    assert not (tmp_path / "cache").exists() and rt.pack.denoiser.__class__.__name__ == "Denoiser"
    load_runtime(GenerateConfig(**gen_kwargs, backend="ort"))
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 1 and manifests[0].parent.name == "ort-fp32-cpu-b8"
    before = manifests[0].stat().st_mtime_ns
    rt = load_runtime(GenerateConfig(**gen_kwargs, backend="ort"))  # fresh: reused, not rebuilt
    assert rt.models.denoiser.backend.name == "ort"
    assert type(rt.pack.denoiser).__name__ == "Denoiser"  # the pack stays a value: backends live beside it
    assert manifests[0].stat().st_mtime_ns == before


def test_two_runs_starting_together_build_the_engine_cache_once(gen_kwargs, tmp_path, monkeypatch):
    import threading
    import time

    from synthgen import engines

    monkeypatch.setenv("SYNTHGEN_ENGINE_CACHE", str(tmp_path / "cache"))
    real_build, builds = engines.build_engine, []

    def slow_build(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.5)  # wide enough for the other run to arrive mid-build
        return real_build(*args, **kwargs)

    monkeypatch.setattr(engines, "build_engine", slow_build)
    cfg = GenerateConfig(**gen_kwargs, backend="ort")
    runtimes, errors = [], []

    def start():
        try:
            runtimes.append(load_runtime(cfg))
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(runtimes) == 2 and len(builds) == 1
    assert all(rt.models.denoiser.backend.name == "ort" for rt in runtimes)


def test_on_the_fly_engines_are_built_at_each_stage_batch(gen_kwargs, tmp_path, monkeypatch):
    # Guidance doubles the denoiser's rows; the filter encoder runs in chunks of its own size.
    monkeypatch.setenv("SYNTHGEN_ENGINE_CACHE", str(tmp_path / "cache"))
    cfg = GenerateConfig(**{**gen_kwargs, "guidance": 2.0}, backend="ort", filter_batch=16)
    rt = load_runtime(cfg)
    (manifest,) = (tmp_path / "cache").rglob("manifest.json")
    assert manifest.parent.name == "ort-fp32-cpu-b8-f16-cfg"
    components = read_manifest(manifest.parent).components
    assert components["denoiser"].buckets == [8, 16] and components["encoder"].buckets == [16]
    assert rt.models.encoder.backend.max_batch == 16


def test_build_engine_sizes_override_batch_per_component(packs, tmp_path):
    manifest = build_engine(packs["tiny-flow"], tmp_path / "e", "eager", "fp32", batch=4,
                            sizes={"vae": (2, 16)})
    entries = manifest.components
    assert (entries["vae"].buckets, entries["vae"].max_batch) == ([2, 16], 16)
    assert entries["denoiser"].max_batch == 4 and entries["encoder"].max_batch == 4
    with pytest.raises(UsageError, match="positive"):
        build_engine(packs["tiny-flow"], tmp_path / "bad", "eager", "fp32", sizes={"vae": (0,)})
    # The CLI names them as generate does.
    from typer.testing import CliRunner

    from synthgen.cli import app

    result = CliRunner().invoke(app, ["build-engine", "--pack", str(packs["tiny-flow"]), "--backend", "eager",
                                      "--batch", "4", "--decode-batch", "8", "--filter-batch", "2",
                                      "--device", "cpu", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    entries = read_manifest(tmp_path / "cli").components
    assert [entries[c].max_batch for c in ("denoiser", "vae", "encoder")] == [4, 8, 2]


def test_auto_keeps_fastest_within_tolerance(packs, tmp_path):
    manifest = build_engine(packs["tiny-unet"], tmp_path / "auto", "auto", "fp32", batch=4,
                            components=("encoder",), candidates=("eager", "ort"))
    entry = manifest.components["encoder"]
    assert entry.backend in ("eager", "ort") and len(entry.candidates) == 2
    best = min(c["seconds_per_batch"] for c in entry.candidates if c["within_tolerance"])
    assert entry.seconds_per_batch == best
    assert not (tmp_path / "auto" / ".auto").exists()


def test_missing_tensorrt_is_a_clear_cli_error(tiny_pack, tmp_path):
    if unavailable_reason("trt", "cuda") is None:
        pytest.skip("TensorRT and a GPU are present here")
    cmd = [sys.executable, "-c", "from synthgen.cli import main; main()", "build-engine", "--pack", str(tiny_pack),
           "--backend", "trt", "--precision", "fp16", "--out", str(tmp_path / "e"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "backend 'trt' is unavailable" in proc.stderr and "--backend ort or compile" in proc.stderr
    if not HAS_TENSORRT:
        assert "TensorRT is not installed (pip install tensorrt)" in proc.stderr


def test_ort_bf16_is_refused_with_the_alternative(tiny_pack, tmp_path):
    with pytest.raises(UsageError, match="use --precision fp16 with ort"):
        build_engine(tiny_pack, tmp_path / "e", "ort", "bf16")


@pytest.mark.skipif(not SLOW, reason="AOTInductor takes 20-50 s per bucket on two cores; SYNTHGEN_SLOW_TESTS=1")
def test_compile_aot_packages_match_eager(packs, tmp_path):
    manifest = build_engine(packs["tiny"], tmp_path / "c", "compile", "bf16", batch=4, buckets=(2, 4),
                            components=("denoiser",))
    entry = manifest.components["denoiser"]
    assert entry.files == ["denoiser.b2.pt2", "denoiser.b4.pt2"] and entry.error["max_rel"] < TOLERANCE["bf16"]
    errors = _compare(packs["tiny"], tmp_path / "c", batch=3)
    assert errors["denoiser"]["max_rel"] < TOLERANCE["bf16"]


@pytest.mark.skipif(unavailable_reason("trt", "cuda") is not None, reason="needs TensorRT and a CUDA GPU")
def test_trt_fp16_buckets_match_eager(packs, tmp_path):
    manifest = build_engine(packs["tiny-unet"], tmp_path / "t", "trt", "fp16", batch=8, buckets=(2, 8),
                            device="cuda")
    for entry in manifest.components.values():
        assert entry.error["max_rel"] < TOLERANCE["fp16"] and entry.buckets == [2, 8]
    pack = load_pack(packs["tiny-unet"], device="cuda")
    for component, backend in load_backends(tmp_path / "t", pack, "cuda").items():
        for batch in (1, 2, 5, 8, 9):  # padding, exact buckets, and splitting; replays CUDA graphs
            inputs = random_inputs(pack.config, component, batch, seed=batch, device="cuda")
            with torch.inference_mode():
                err = output_error(getattr(pack, component)(*inputs), run_bucketed(backend, *inputs))
            assert err["max_rel"] < TOLERANCE["fp16"], (component, batch, err)
