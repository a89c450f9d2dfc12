"""Batch scheduler and streaming pipeline: buckets, stage sizes, out-of-memory backoff, NaN/Inf retry, overlap.

The networks are the tiny pack's real ones; only failures are test doubles (a denoiser wrapper that raises
an out-of-memory error above a batch size, or writes NaN into chosen rows).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from synthgen.config import GenerateConfig, parse_buckets
from synthgen.errors import UsageError
from synthgen.render import render_batch
from synthgen.pipeline import run_generate
from synthgen.runstate import finalize_run, run_folder
from synthgen.runtime import load_runtime
from synthgen.shard_job import restore_batch_sizes, run_shards
from synthgen.scheduler import (
    AdaptiveBatch, default_buckets, is_out_of_memory, pad_rows, padded_size, retry_dtype, run_chunked,
)
from synthgen.encode import resolve_image_encoder
from synthgen.shards import shard_path, stats_path


def shard_bytes(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.tar"))}


def stats(run_dir, k) -> dict:
    return json.loads(stats_path(run_dir, k).read_text())


def run_with(rt, shards) -> list[dict]:
    """Generate `shards` with a runtime whose networks a test has wrapped."""
    folder = run_folder(rt.cfg)
    folder.create()
    return [s.to_dict() for s in run_shards(rt, folder, shards)]


def wrap(rt, **modules) -> None:
    """Put test doubles in place of the runtime's networks, in the pack too: the higher-precision retry
    copies the pack's eager modules."""
    rt.models = dataclasses.replace(rt.models, **modules)
    rt.pack = dataclasses.replace(rt.pack, **modules)


@pytest.fixture
def reference(gen_kwargs, tmp_path):
    """Shard bytes of a plain run of gen_kwargs (batch 8, default buckets)."""
    kw = {**gen_kwargs, "out": tmp_path / "reference"}
    run_generate(GenerateConfig(**kw))
    return shard_bytes(kw["out"])


# ---- the pieces ------------------------------------------------------------------------------------


def test_buckets_and_padding():
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(24, 8, 64) == (1, 2, 4, 8, 16, 24, 32, 64)
    assert padded_size(5, (8, 32), 32) == 8 and padded_size(9, (8, 32), 32) == 32
    assert padded_size(9, (8, 32), 16) == 9  # after a backoff to 16 the 32 bucket is off limits
    x = torch.arange(6.0).view(3, 2)
    assert pad_rows(x, 3) is x
    assert pad_rows(x, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]


def test_parse_buckets():
    assert parse_buckets("32, 8,128,8") == (8, 32, 128)
    assert parse_buckets(None) is None and parse_buckets("") is None
    for bad in ("8,x", "0,8", ",", "-4"):
        with pytest.raises(UsageError, match="--batch-buckets"):
            parse_buckets(bad)
    cfg = GenerateConfig(n=10, out="unused", pack="unused", batch=16, decode_batch=4, batch_buckets="4,16")
    assert cfg.batch_sizes.buckets == (4, 16) and cfg.batch_sizes.unit == 16 and cfg.batch_sizes.filter == 16


def test_generate_cli_forwards_the_scheduler_options(tmp_path):
    from typer.testing import CliRunner

    from synthgen.cli import app

    result = CliRunner().invoke(app, ["generate", "--n", "4", "--out", str(tmp_path / "r"), "--pack", "unused",
                                      "--batch-buckets", "8,x"])
    assert isinstance(result.exception, UsageError) and "--batch-buckets '8,x'" in str(result.exception)
    result = CliRunner().invoke(app, ["generate", "--n", "4", "--out", str(tmp_path / "r"), "--pack", "unused",
                                      "--image-encoder", "gif"])
    assert isinstance(result.exception, UsageError) and "--image-encoder" in str(result.exception)


def test_execution_fields_do_not_change_the_identity():
    base = GenerateConfig(n=10, out="unused", pack="unused")
    other = GenerateConfig(n=10, out="unused", pack="unused", batch_buckets="2,8", decode_batch=2, filter_batch=3,
                           encode_workers=1, image_encoder="pillow")
    assert base.identity() == other.identity()


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : Failed to allocate: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a runtime failure


def test_run_chunked_halves_and_remembers(caplog):
    seen = []

    def fn(start, stop, padded):
        seen.append(padded)
        if padded > 4:
            raise torch.OutOfMemoryError("out of memory")
        return list(range(start, stop))

    batch = AdaptiveBatch("denoise", 16)
    with caplog.at_level(logging.WARNING, logger="synthgen.scheduler"):
        out = run_chunked(fn, 11, batch, default_buckets(16))
        out += run_chunked(fn, 3, batch, default_buckets(16))  # a later batch starts at the remembered size
    assert sum(out, []) == list(range(11)) + list(range(3))
    assert batch.size == 4 and batch.backoffs == 2 and seen[:3] == [16, 8, 4]
    assert max(seen[3:]) == 4
    assert len(caplog.records) == 2 and "continuing at batch 4" in caplog.records[-1].getMessage()


def test_out_of_memory_at_batch_one_is_a_clear_error():
    def fn(start, stop, padded):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(UsageError, match="out of memory at batch size 1"):
        run_chunked(fn, 4, AdaptiveBatch("decode", 2), (1, 2))


def test_retry_precision():
    assert retry_dtype(torch.float16) == retry_dtype(torch.bfloat16) == torch.float32
    assert retry_dtype(torch.float32) == torch.float64


def test_image_encoder_choice():
    assert resolve_image_encoder("auto", "jpg", "cpu") in ("simplejpeg", "pillow")
    assert resolve_image_encoder("auto", "png", "cpu") == "pillow"
    with pytest.raises(UsageError, match="nvjpeg needs a CUDA device"):
        resolve_image_encoder("nvjpeg", "jpg", "cpu")


# ---- buckets and stage sizes in a run ------------------------------------------------------------------


class Recording(nn.Module):
    """Passes through to `inner` and records the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x, *rest):
        self.sizes.append(x.shape[0])
        return self.inner(x, *rest)


class ScaleByOne(nn.Module):
    """A stand-in VAE for the pixel-space tiny pack: the identity, so images are unchanged."""

    def forward(self, x):
        return x * 1.0


def test_padded_tails_never_leak_and_stage_sizes_change_nothing(gen_kwargs, reference, tmp_path):
    kw = {**gen_kwargs, "out": tmp_path / "staged", "decode_batch": 2, "filter_batch": 3, "batch_buckets": "4,8"}
    rt = load_runtime(GenerateConfig(**kw))
    wrap(rt, denoiser=Recording(rt.pack.denoiser), vae=Recording(ScaleByOne()),
         encoder=Recording(rt.pack.encoder))
    results = run_with(rt, [0, 1, 2])
    assert shard_bytes(kw["out"]) == reference  # padded rows dropped; chunk sizes never change an image
    assert [r["count"] for r in results] == [10, 10, 4] and all(r["unused"] == 0 for r in results)
    assert set(rt.pack.denoiser.sizes) == {8, 4}  # shards of 10 run as 8 + (2 padded to 4); the last as 4
    # Buckets above a stage's own size are never used (that size is what fits in memory).
    assert max(rt.pack.vae.sizes) == 2 and max(rt.pack.encoder.sizes) == 3


def test_padded_rows_do_not_change_scores(gen_kwargs):
    rt = load_runtime(GenerateConfig(**{**gen_kwargs, "batch_buckets": "16"}))
    padded = render_batch(rt, np.arange(5), keep_pixels=True)  # 5 rows run as a 16-row bucket
    rt = load_runtime(GenerateConfig(**gen_kwargs))
    plain = render_batch(rt, np.arange(5), keep_pixels=True)
    assert len(padded.scores) == len(padded.valid) == len(padded.images) == 5
    torch.testing.assert_close(padded.pixels, plain.pixels, atol=1e-5, rtol=0)
    np.testing.assert_allclose(padded.scores, plain.scores, atol=1e-5)


# ---- out-of-memory backoff ---------------------------------------------------------------------------


class OutOfMemoryAbove(nn.Module):
    """Test double of a device that runs out of memory above `limit` rows."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x, t, cond):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {x.shape[0]} rows")
        return self.inner(x, t, cond)


def test_out_of_memory_halves_the_batch_and_the_run_completes_with_the_same_images(gen_kwargs, reference,
                                                                                      tmp_path, caplog):
    kw = {**gen_kwargs, "out": tmp_path / "oom"}
    rt = load_runtime(GenerateConfig(**kw))
    wrap(rt, denoiser=OutOfMemoryAbove(rt.pack.denoiser, limit=3))
    with caplog.at_level(logging.WARNING, logger="synthgen.scheduler"):
        results = run_with(rt, [0, 1, 2])
    assert shard_bytes(kw["out"]) == reference
    assert rt.batches["denoise"].size == 2 and results[0]["oom_backoffs"] == 2
    assert sum(r["oom_backoffs"] for r in results) == 2  # remembered: later shards start at 2
    assert results[-1]["batch_sizes"]["denoise"] == 2
    assert finalize_run(run_folder(rt.cfg), rt.cfg, rt.bank.class_names)["totals"]["oom_backoffs"] == 2  # in dataset.json
    assert [r.getMessage() for r in caplog.records] == [
        "denoise: out of memory at batch 8, continuing at batch 4 for the rest of the run",
        "denoise: out of memory at batch 4, continuing at batch 2 for the rest of the run",
    ]


def test_a_resumed_run_starts_at_the_size_an_earlier_process_backed_off_to(gen_kwargs, reference, tmp_path,
                                                                             caplog):
    kw = {**gen_kwargs, "out": tmp_path / "oom"}
    first = load_runtime(GenerateConfig(**kw))
    wrap(first, denoiser=OutOfMemoryAbove(first.pack.denoiser, limit=3))
    assert run_with(first, [0])[0]["batch_sizes"]["denoise"] == 2  # that process is gone; shard 0 stays
    # A new process on the same folder and device: no out-of-memory error needed to learn the size again.
    second = load_runtime(GenerateConfig(**kw))
    wrap(second, denoiser=OutOfMemoryAbove(second.pack.denoiser, limit=3))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synthgen.scheduler"):
        rest = run_with(second, [1, 2])
    assert [r["oom_backoffs"] for r in rest] == [0, 0] and rest[0]["batch_sizes"]["denoise"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "denoise: starting at batch 2, where an earlier run on this folder ended after running out of memory "
        "at 8 on this device (give another --batch to try again)",
    ]
    assert shard_bytes(kw["out"]) == reference
    # Another --batch (or another device) is a fresh start: the remembered size was learned for batch 8.
    # (Every shard is committed by now, so the restore a first shard would make is called directly.)
    third = load_runtime(GenerateConfig(**{**kw, "batch": 4}))
    restore_batch_sizes(third, run_folder(third.cfg))
    assert third.restored and third.batches["denoise"].size == 4
    fourth = load_runtime(GenerateConfig(**kw))
    restore_batch_sizes(fourth, run_folder(fourth.cfg))
    assert fourth.batches["denoise"].size == 2  # the same settings do take it over


# ---- NaN/Inf guard ---------------------------------------------------------------------------------


class NaNRows(nn.Module):
    """Test double of a numerically unstable denoiser: NaN output for the rows whose condition's first
    value is above `cut` (a fixed set of samples), in float32 only, or in every precision."""

    def __init__(self, inner, cut, every_precision=False):
        super().__init__()
        self.inner, self.cut, self.every_precision = inner, cut, every_precision

    def forward(self, x, t, cond):
        out = self.inner(x, t, cond)
        if x.dtype == torch.float32 or self.every_precision:
            out = torch.where((cond[:, :1] > self.cut).view(-1, 1, 1, 1), torch.nan, out)
        return out


def _poisoned_runtime(kw, every_precision):
    rt = load_runtime(GenerateConfig(**kw))
    cut = float(np.quantile(rt.bank.embeddings[:, 0].float().numpy(), 0.8))  # ~20% of the samples
    wrap(rt, denoiser=NaNRows(rt.pack.denoiser, cut, every_precision))
    return rt


def test_nan_rows_are_retried_in_float64_and_rescued(gen_kwargs):
    rt = _poisoned_runtime(gen_kwargs, every_precision=False)
    batch = render_batch(rt, np.arange(24))
    assert 0 < batch.retried.sum() < 24 and batch.valid.all() and np.isfinite(batch.scores).all()
    assert rt.retry is not None and rt.retry.dtype == torch.float64
    clean = render_batch(load_runtime(GenerateConfig(**gen_kwargs)), np.arange(24))
    assert np.abs(batch.images.astype(int) - clean.images).max() <= 1  # the same images, in more precision


def test_nan_rows_that_stay_nan_are_dropped_and_counted(gen_kwargs):
    kw = {**gen_kwargs, "min_score": -1.0, "max_oversample": 2}  # a filter that keeps every finite image
    rt = _poisoned_runtime(kw, every_precision=True)
    results = run_with(rt, [0, 1, 2])
    assert [r["count"] for r in results] == [10, 10, 4]
    assert sum(r["nonfinite"] for r in results) > 0
    for r in results:
        assert r["retried"] == r["nonfinite"] and r["candidates"] == r["count"] + r["rejected"] + r["surplus"]
    totals = finalize_run(run_folder(rt.cfg), rt.cfg, rt.bank.class_names)["totals"]
    assert totals["retried"] == totals["nonfinite"] == sum(r["nonfinite"] for r in results) > 0
    import webdataset as wds

    urls = sorted(str(p) for p in gen_kwargs["out"].glob("*.tar"))
    metas = [s["json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert len(metas) == 24 and all(m["score"] is not None for m in metas)


# ---- overlap: failures surface, memory stays bounded -------------------------------------------------


def test_overlap_auto_is_inline_on_cpu_and_a_device_thread_when_asked(gen_kwargs):
    from synthgen.overlap import CandidateStream, InlineStream, open_stream

    for overlap, kind in (("auto", None), ("inline", InlineStream), ("thread", CandidateStream)):
        rt = load_runtime(GenerateConfig(**gen_kwargs, overlap=overlap))
        kind = kind or (CandidateStream if rt.device.type == "cuda" else InlineStream)
        stream = open_stream(rt, 0, 10)
        try:
            assert isinstance(stream, kind), overlap
            stream.want(10)
            assert len(stream.next().scores) == 8 and len(stream.next().scores) == 2  # unit 8, then the rest
        finally:
            stream.close()
    with pytest.raises(RuntimeError, match="past the wanted candidates"):
        InlineStream(rt, 0, 10).next()


def test_device_thread_and_inline_write_the_same_bytes(gen_kwargs, tmp_path):
    written = {}
    for overlap in ("inline", "thread"):
        kw = {**gen_kwargs, "out": tmp_path / overlap, "overlap": overlap}
        run_generate(GenerateConfig(**kw))
        written[overlap] = shard_bytes(kw["out"])
    assert len(written["inline"]) == 3 and written["inline"] == written["thread"]
    with pytest.raises(UsageError, match="--overlap 'both' is not one of"):
        GenerateConfig(**{**gen_kwargs, "overlap": "both"})


@pytest.mark.parametrize("overlap", ["inline", "thread"])
def test_an_encoder_failure_fails_the_run_loudly(gen_kwargs, monkeypatch, overlap):
    import synthgen.encode as encode

    real, calls = encode.encode_image, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 15:
            raise OSError("encoder worker died")
        return real(*args)

    monkeypatch.setattr(encode, "encode_image", flaky)
    with pytest.raises(OSError, match="encoder worker died"):
        run_generate(GenerateConfig(**gen_kwargs, overlap=overlap))
    run_dir = gen_kwargs["out"]
    assert stats_path(run_dir, 0).exists() and not shard_path(run_dir, 1).exists()
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize("overlap", ["inline", "thread"])
def test_a_device_failure_fails_the_run_loudly(gen_kwargs, tmp_path, overlap):
    class Broken(nn.Module):
        def forward(self, x, t, cond):
            raise ValueError("bad kernel")

    rt = load_runtime(GenerateConfig(**{**gen_kwargs, "out": tmp_path / "broken", "overlap": overlap}))
    wrap(rt, denoiser=Broken())
    with pytest.raises(ValueError, match="bad kernel"):
        run_with(rt, [0])
    assert not list((tmp_path / "broken").glob("*.tmp")) and not shard_path(tmp_path / "broken", 0).exists()


PEAK_RSS = """
import resource, sys
from synthgen.config import GenerateConfig
from synthgen.pipeline import run_generate
n, out, pack, bank = sys.argv[1:]
run_generate(GenerateConfig(n=int(n), out=out, pack=pack, bank=bank, sampler="ddim", steps=1, shard_size=8,
                            batch=4, format="png", progress=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def test_peak_memory_does_not_grow_with_n(tiny_pack, digits_bank, tmp_path):
    def peak_kib(n: int) -> int:
        args = [sys.executable, "-c", PEAK_RSS, str(n), str(tmp_path / f"n{n}"), str(tiny_pack), str(digits_bank)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    small, large = peak_kib(16), peak_kib(160)
    assert large - small < 30 * 1024, f"peak RSS {small} KiB at --n 16, {large} KiB at --n 160"


def test_a_signal_inside_a_commit_is_raised_after_it():
    """SIGTERM between a shard's rename and its stats file would leave a tar without its done marker."""
    import signal as signal_module

    from synthgen.signals import Interrupted, signals_deferred, stop_on_signals

    steps = []
    with stop_on_signals():
        with pytest.raises(Interrupted):
            with signals_deferred():
                signal_module.raise_signal(signal_module.SIGTERM)
                steps.append("after the signal, still inside")
        assert steps == ["after the signal, still inside"]
