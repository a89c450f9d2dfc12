"""`synthgen bench`: the CLI end to end on the tiny preset, its JSON contract, and clear errors for bad flags.

Throughput numbers are never asserted against a floor.
"""

from __future__ import annotations

import inspect
import json
import math
import sys

import pytest
from typer.testing import CliRunner

from synthgen.benchmark import STAGES
from synthgen.config import BenchConfig, parse_int_list
from synthgen.cli import app, bench, main
from synthgen.errors import UsageError

runner = CliRunner()


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run the installed entry point (what a user's shell runs): exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["synthgen", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_bench_tiny_preset_writes_table_json_and_markdown(tmp_path):
    out, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    result = runner.invoke(app, [
        "bench", "--preset", "tiny", "--steps", "1,2", "--batch", "4", "--n", "8", "--naive-batch", "2",
        "--repeats", "1", "--matmul-size", "128", "--dtype", "fp32", "--naive-dtype", "bf16", "--filter-batch", "8",
        "--json", str(out), "--md", str(md),
        "--plot", str(png),
    ])
    assert result.exit_code == 0, result.output
    for header in ("stage", "images/s", "denoise_step", "synthgen/naive", "peak"):
        assert header in result.output
    assert png.is_file() or "plot skipped: matplotlib is not installed" in result.output

    doc = json.loads(out.read_text())
    stages = {s["stage"] for s in doc["stages"]}
    assert stages == set(STAGES) - {"vae_decode"}  # the tiny preset is a pixel-space pack: no VAE
    for s in doc["stages"]:
        assert math.isfinite(s["images_per_s"]) and s["images_per_s"] > 0, s
    assert [(e["steps"], e["batch"]) for e in doc["end_to_end"]] == [(1, 4), (2, 4)]
    for e in doc["end_to_end"]:
        assert math.isfinite(e["ratio_vs_naive"]) and e["ratio_vs_naive"] > 0
        assert e["n"] == 8 and e["naive_batch"] == 2 and e["gflop_per_img"] > 0 and e["share_of_peak"] > 0
        assert e["naive_dtype"] == "bf16"  # the run itself stays fp32
        assert (e["decode_batch"], e["filter_batch"]) == (4, 8)
        # A pixel-space pack decodes nothing: only the filter re-encode sits beside the denoiser's FLOPs.
        assert 0.5 < e["denoise_flop_share"] < 1 and 0 < e["naive_share_of_peak"]
        # The ceiling: synthgen at the fp32 peak over the bf16 naive loop's measured FLOP rate.
        naive_flops = e["gflop_per_img"] * e["naive_images_per_s"]
        assert e["ratio_bound"] == pytest.approx(doc["peak_gflops"]["fp32"] / naive_flops)
    assert "synthgen run_generate, filter batch 8 vs naive" in result.output and "bounds:" in result.output
    assert set(doc["peak_gflops"]) == {"fp32", "bf16"}  # the naive loop's dtype gets its own peak
    assert "naive diffusers-style loop at batch 2, eager bf16" in result.output
    env = doc["environment"]
    assert env["versions"]["torch"] and env["torch_threads"] >= 1 and env["dtype"] == "fp32"
    assert env["device"]["type"] == "cpu" and env["cpu_cores"] >= 1 and len(env["load_avg_end"]) == 3
    assert env["command"].startswith("synthgen bench --preset tiny --dtype fp32 --steps 1,2 --batch 4")
    assert doc["peak_gflops"]["fp32"] > 0 and doc["pack"]["gflop_per_img"]["denoiser"] > 0
    text = md.read_text()
    assert env["command"] in text and "load average" in text and "synthgen/naive" in text


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps"),
    (["--steps", "1,x"], "--steps"),
    (["--batch", "abc"], "--batch"),
    (["--batch", ""], "--batch"),
    (["--repeats", "0"], "--repeats"),
    (["--preset", "huge"], "--preset 'huge' is not one of"),
    (["--preset", "tiny", "--pack", "p"], "--pack or --preset"),
    (["--backend", "fast"], "--backend 'fast'"),
    (["--n", "ten"], "--n 'ten'"),
    (["--naive-dtype", "fp8"], "--naive-dtype 'fp8' is not one of"),
    (["--filter-batch", "0"], "--filter-batch"),
])
def test_bad_flags_exit_2_with_a_clear_message(monkeypatch, capsys, args, message):
    code, err = run_main(monkeypatch, capsys, "bench", *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_parse_int_list():
    assert parse_int_list("1,4,25", "--steps") == (1, 4, 25)
    assert parse_int_list(" 8, 32 ,8", "--batch") == (8, 32)
    for bad in ("0", "-1", "a", "", "1.5", ","):
        with pytest.raises(UsageError, match="--steps"):
            parse_int_list(bad, "--steps")


def test_cli_defaults_equal_bench_config_defaults():
    params = inspect.signature(bench).parameters
    config = BenchConfig()  # "auto" dtype resolves on construction: the CLI shows the field default
    assert params["steps"].default.default == ",".join(map(str, config.steps))
    assert params["batch"].default.default == ",".join(map(str, config.batches))
    for name in ("backend", "dtype", "device", "sampler", "guidance", "naive_batch", "repeats", "e2e_repeats",
                 "matmul_size"):
        assert params[name].default.default == BenchConfig.__dataclass_fields__[name].default, name
    assert int(params["n"].default.default) == config.n


def test_help_teaches():
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for word in ("denoise_step", "vae_decode", "image_encode", "naive", "Examples", "--preset", "--json", "--plot"):
        assert word in result.output


@pytest.mark.parametrize("preset,sampler", [("tiny-flow", "euler"), ("tiny", "ddpm"), ("tiny", "ddim")])
def test_model_stages_and_naive_call_on_other_packs_and_samplers(tmp_path, preset, sampler):
    """The VAE stage appears for latent packs; the naive loop runs every diffusers scheduler it maps to."""
    import numpy as np
    import torch

    from synthgen.benchmark import StageInputs, batch_stages, component_flops, naive_call
    from synthgen.pack import load_pack
    from synthgen.presets import write_random_pack

    write_random_pack(preset, tmp_path / "pack")
    pack = load_pack(tmp_path / "pack")
    cfg = BenchConfig(preset=preset, sampler=sampler, repeats=1, warmup=0, dtype="fp32")
    cond = torch.randn(3, pack.config.denoiser.cond_dim)
    images, scores = naive_call(pack, cond, cfg, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    size = pack.config.image_size
    assert images.shape == (3, size, size, 3) and images.dtype == np.uint8 and scores.shape == (3,)
    inputs = StageInputs([images[0]], images, cond, np.zeros(3, dtype=np.int64))
    flops = component_flops(tmp_path / "pack")
    stages = batch_stages(pack, inputs, cfg, 2, torch.device("cpu"), flops, peak=1e11)
    names = [s.stage for s in stages]
    assert names == ["encode", "denoise_step"] + (["vae_decode"] if pack.vae is not None else []) + ["filter"]
    assert all(s.images_per_s > 0 and s.gflop_per_img > 0 for s in stages)
