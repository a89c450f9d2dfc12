"""What a hostile but fair user tries: huge and sparse labels, damaged committed shards, runs that end
short, NaN banks, a file as --out, and growing a finished run. Each case is small: the behaviour is the point."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from synthgen.bank import load_bank, write_bank
from synthgen.cli import EXIT_INCOMPLETE, EXIT_PROBLEMS, app
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.labels import MAX_LABEL
from synthgen.pipeline import run_generate
from synthgen.shards import shard_path
from synthgen.sources import open_source
from synthgen.train.data import load_shards
from synthgen.verify import verify_run


def tar_bytes(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.tar"))}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- 1. labels ---------------------------------------------------------------------------------------------


def _labelled_tar(path, labels: list[bytes]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    with tarfile.open(path, "w") as tar:
        for i, cls in enumerate(labels):
            for ext, data in (("png", buf.getvalue()), ("cls", cls)):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_huge_and_sparse_labels_keep_memory_bounded(tmp_path):
    tar = tmp_path / "hostile.tar"
    _labelled_tar(tar, [b"100000000", b"3", b"99999999999999999999", b"-4", b"abc", b"3"])
    source = open_source(str(tar))
    assert source.class_names == ["3", "100000000"]  # the labels seen, not every integer up to the largest
    items = list(source)
    assert [i.label for i in items if i.error is None] == [1, 0, 0]
    errors = [i.error for i in items if i.error]
    assert any(f"above {MAX_LABEL}" in e for e in errors) and any(">= 0" in e for e in errors)
    assert any("ASCII int" in e for e in errors)
    data = load_shards(str(tar), 8)  # what train classifier reads
    assert data.class_names == ["3", "100000000"] and data.labels.tolist() == [1, 0, 0]


# ---- 2. damaged committed shards -----------------------------------------------------------------------------


def test_a_truncated_shard_is_redone_on_resume_and_a_flipped_byte_by_verify_repair(gen_kwargs):
    run_dir = gen_kwargs["out"]
    run_generate(GenerateConfig(**gen_kwargs))
    original = tar_bytes(run_dir)
    t0, t1 = shard_path(run_dir, 0), shard_path(run_dir, 1)
    t0.write_bytes(original[t0.name][:-1024])
    flipped = bytearray(original[t1.name])
    flipped[700] ^= 0xFF  # inside the first image: the size is right, the sha256 is not
    t1.write_bytes(bytes(flipped))
    report = verify_run(run_dir)
    assert report.damaged == {0, 1}
    result = cli("verify", run_dir)
    assert result.exit_code == EXIT_PROBLEMS and "--repair" in result.output
    # Resume checks each committed shard's size against its stats: the truncated one is redone unasked.
    assert run_generate(GenerateConfig(**gen_kwargs)).shards_written == [0]
    assert verify_run(run_dir).damaged == {1}
    result = cli("verify", run_dir, "--repair")
    assert result.exit_code == 0, result.output
    assert "repaired 1 damaged shard(s) [1]" in result.output
    assert tar_bytes(run_dir) == original  # byte-identical: every sample is seeded
    assert "nothing to repair" in cli("verify", run_dir, "--repair").output


# ---- 3. exit codes --------------------------------------------------------------------------------------------


def test_a_run_that_ends_short_exits_non_zero_with_the_fix(gen_kwargs):
    args = ["generate", "--n", 24, "--out", gen_kwargs["out"], "--pack", gen_kwargs["pack"], "--bank",
            gen_kwargs["bank"], "--steps", 1, "--shard-size", 10, "--device", "cpu", "--no-progress"]
    result = cli(*args, "--min-score", 0.9999, "--max-oversample", 1)
    assert result.exit_code == EXIT_INCOMPLETE, result.output
    assert "--min-score" in result.output and "images          0" in result.output
    result = cli("verify", gen_kwargs["out"])
    assert result.exit_code == EXIT_INCOMPLETE
    assert "OK: 0 samples" in result.output and "incomplete: 3 of 3 shards committed" in result.output


def test_a_shard_range_job_that_finishes_its_range_exits_zero_and_verify_says_incomplete(gen_kwargs):
    args = ["generate", "--n", 24, "--out", gen_kwargs["out"], "--pack", gen_kwargs["pack"], "--bank",
            gen_kwargs["bank"], "--steps", 1, "--shard-size", 10, "--device", "cpu", "--no-progress"]
    assert cli(*args, "--shards", "0:1").exit_code == 0  # its range is done: a SLURM array job succeeded
    result = cli("verify", gen_kwargs["out"])
    assert result.exit_code == EXIT_INCOMPLETE
    assert "incomplete: 1 of 3 shards committed; rerun the same generate command" in result.output
    assert "class " not in result.output  # no per-class mismatches for a run that is merely incomplete


# ---- 4. non-finite banks ----------------------------------------------------------------------------------------


def test_nan_and_inf_bank_rows_are_refused_with_their_keys(tmp_path):
    emb = torch.randn(4, 8)
    emb[2, 3] = float("nan")
    with pytest.raises(UsageError, match=r"1 of 4 embeddings to write .*'k2'"):
        write_bank(tmp_path / "b", emb, [0, 1, 0, 1], ["k0", "k1", "k2", "k3"], ["a", "b"], "enc", "src")
    with pytest.raises(UsageError, match=r"1 of 4 .*'k1'.*65504"):  # finite in float32, inf in float16
        write_bank(tmp_path / "b", torch.tensor([[0.0], [1e6], [1.0], [2.0]]), [0, 1, 0, 1],
                   ["k0", "k1", "k2", "k3"], ["a", "b"], "enc", "src")
    write_bank(tmp_path / "b", torch.randn(4, 8), [0, 1, 0, 1], ["k0", "k1", "k2", "k3"], ["a", "b"], "enc", "src")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "b" / "embeddings.safetensors"))
    tensors["embeddings"][3, 0] = float("inf")  # written by something else
    save_file(tensors, str(tmp_path / "b" / "embeddings.safetensors"))
    with pytest.raises(UsageError, match=r"1 of 4 rows of the embedding bank .*'k3'"):
        load_bank(tmp_path / "b")


# ---- 5. small ones -----------------------------------------------------------------------------------------------


def test_out_naming_a_file_is_a_clear_error_without_a_traceback(gen_kwargs, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        run_generate(GenerateConfig(**{**gen_kwargs, "out": target}))
    assert target.read_text() == "mine"
    proc = subprocess.run([sys.executable, "-c", "from synthgen.cli import main; main()", "generate", "--n", "4",
                           "--out", str(target / "sub"), "--pack", str(gen_kwargs["pack"]), "--bank",
                           str(gen_kwargs["bank"]), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is a file" in proc.stderr


# ---- 6. growing a run ----------------------------------------------------------------------------------------------


def test_growing_a_run_keeps_its_full_shards_and_equals_a_fresh_larger_run(gen_kwargs, tmp_path):
    grown = {**gen_kwargs, "out": tmp_path / "grown"}
    run_generate(GenerateConfig(**grown))  # n=24: shards of 10, 10, 4
    kept = {k: shard_path(grown["out"], k).stat().st_mtime_ns for k in (0, 1)}
    summary = run_generate(GenerateConfig(**{**grown, "n": 34}))
    assert summary.shards_written == [2, 3] and summary.complete  # the old short shard 2 grows to 10
    assert {k: shard_path(grown["out"], k).stat().st_mtime_ns for k in (0, 1)} == kept
    fresh = {**gen_kwargs, "n": 34, "out": tmp_path / "fresh"}
    run_generate(GenerateConfig(**fresh))
    assert tar_bytes(grown["out"]) == tar_bytes(fresh["out"])
    assert json.loads((grown["out"] / "dataset.json").read_text())["identity"]["n"] == 34
    assert verify_run(grown["out"]).ok
    with pytest.raises(UsageError, match="would shrink it"):
        run_generate(GenerateConfig(**{**grown, "n": 20}))


def test_a_short_tail_shard_equals_the_prefix_of_the_grown_one(gen_kwargs, tmp_path):
    # Why growing works: a shard's samples are a prefix of the same shard with a larger target.
    import webdataset as wds

    run_generate(GenerateConfig(**gen_kwargs))
    run_generate(GenerateConfig(**{**gen_kwargs, "n": 30, "out": tmp_path / "big"}))
    keys = lambda p: [s["__key__"] for s in wds.WebDataset(str(p), shardshuffle=False)]  # noqa: E731
    small, big = keys(shard_path(gen_kwargs["out"], 2)), keys(shard_path(tmp_path / "big", 2))
    assert len(small) == 4 and big[:4] == small
