"""The command line: each verb end to end through typer, defaults forwarded from the dataclass, clear errors."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from typer.testing import CliRunner

from synthgen.cli import app, generate
from synthgen.config import GenerateConfig, parse_count, parse_shard_range
from synthgen.errors import UsageError

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_cli_defaults_equal_dataclass_defaults():
    params = inspect.signature(generate).parameters
    for field in dataclasses.fields(GenerateConfig):
        if field.name in ("n", "out", "pack", "bank", "shards", "min_score", "keep_top"):
            continue
        assert params[field.name].default.default == field.default, field.name


@pytest.mark.parametrize("text,value", [("1000", 1000), ("10k", 10_000), ("1M", 1_000_000), ("1e6", 1_000_000),
                                        ("2.5k", 2500), ("1_000", 1000), (7, 7)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["ten", "0", "1.5", "-3", "1e-3", ""])
def test_parse_count_rejects(text):
    with pytest.raises(UsageError, match="--n"):
        parse_count(text)


def test_parse_shard_range():
    assert parse_shard_range("2:5") == (2, 5)
    assert parse_shard_range(":3") == (0, 3)
    for bad in ("5:2", "a:b", "3"):
        with pytest.raises(UsageError, match="--shards"):
            parse_shard_range(bad)


def test_embed_generate_verify_preview(tiny_pack, tmp_path):
    images = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (images / cls).mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 24), (50 * i, 10, 200)).save(images / "cat" / f"c{i}.png")
        Image.new("L", (30, 30), 30 * i).save(images / "dog" / f"d{i}.jpg")
    (images / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    bank, run = tmp_path / "bank", tmp_path / "run"
    result = invoke("embed", "--images", images, "--pack", tiny_pack, "--out", bank, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "embedded 6 images" in result.output and "skipped 1 unreadable" in result.output
    assert "dog/broken" in result.output
    result = invoke("generate", "--n", "12", "--pack", tiny_pack, "--bank", bank, "--out", run, "--steps", "2",
                    "--shard-size", "5", "--mode", "interpolate", "--cfg", "2", "--format", "webp", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "images          12" in result.output and "complete" in result.output
    result = invoke("verify", run)
    assert result.exit_code == 0 and "OK: 12 samples in 3 shards" in result.output
    result = invoke("preview", run, "--out", tmp_path / "grid.png", "--per-class", "3")
    assert result.exit_code == 0 and (tmp_path / "grid.png").stat().st_size > 0
    # Tamper with a shard: verify must fail with a non-zero exit.
    tar = run / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = invoke("verify", run)
    assert result.exit_code == 1 and "000001" in result.output


def test_usage_errors_exit_2_with_message(tiny_pack, digits_bank, tmp_path, capsys):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from synthgen.cli import main; main()", "generate", "--n", "ten",
           "--pack", str(tiny_pack), "--bank", str(digits_bank), "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error: --n 'ten' is not a count" in proc.stderr and "Traceback" not in proc.stderr


def test_pack_inspect_reports_params_and_flops(tiny_pack):
    result = invoke("pack", "inspect", tiny_pack)
    assert result.exit_code == 0, result.output
    assert "DiT" in result.output and "GFLOP/img" in result.output and "random weights" in result.output


def test_paper_preset_inspects_without_weights(tmp_path):
    """The published shapes: counted on the meta device, nothing allocated."""
    from synthgen.flops import pack_costs
    from synthgen.presets import preset_config

    costs = {c.name: c for c in pack_costs(preset_config("paper"))}
    assert 855e6 < costs["denoiser"].params < 865e6  # SD-1.x UNet with a 768-d cross-attention: ~859.5M
    assert 160e9 < costs["denoiser"].flops < 180e9  # ~168.6 GFLOP per image per step (ENV-FACTS)
    assert 80e6 < costs["encoder"].params < 90e6  # DINOv2 ViT-B/14
    assert costs["vae"].flops > 500e9  # SD-VAE decoder to 256 px: ~620 GFLOP


def test_help_teaches():
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for option in ("--n", "--sampler", "--min-score", "--keep-top", "--shards", "--overwrite", "Examples"):
        assert option in result.output


def test_dataset_json_records_config_and_versions(gen_kwargs):
    from synthgen.pipeline import run_generate

    run_generate(GenerateConfig(**gen_kwargs))
    doc = json.loads((gen_kwargs["out"] / "dataset.json").read_text())
    assert doc["config"]["sampler"] == "ddim" and doc["versions"]["torch"]
    assert doc["identity"]["steps"] == 2 and "pack_hash" in doc["identity"] and doc["random_weights"] is True


def test_generate_without_pack_uses_the_shipped_default_pack(tmp_path):
    from synthgen.pack import DEFAULT_PACK, read_pack_config
    from synthgen.pipeline import run_generate

    assert (DEFAULT_PACK / "pack.json").is_file(), "the trained default pack must ship inside the package"
    assert not read_pack_config(DEFAULT_PACK).random_weights
    summary = run_generate(GenerateConfig(n=20, out=tmp_path / "run", steps=4, shard_size=10, progress=False))
    assert summary.complete and summary.images == 20
