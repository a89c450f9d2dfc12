"""URL run folders (urlfolder.py) on real fsspec file systems: memory:// and file:// (no S3 reachable here).

Contracts: generate into a URL reads back with webdataset and verifies; resume skips committed shards; a
crash between the tar upload and the stats upload leaves the shard uncommitted and the rerun completes it
byte-identical to a local run; a missing backend is a clear UsageError naming the package.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
import uuid
from pathlib import Path

import pytest
import webdataset as wds

from synthgen.runfolder import is_remote
from synthgen.urlfolder import UrlFolder, filesystem
from synthgen.cli import main
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pipeline import run_generate
from synthgen.preview import make_preview
from synthgen.verify import verify_run


@pytest.fixture
def mem_url():
    url = f"memory://synthgen-test-{uuid.uuid4().hex[:8]}/run"
    yield url
    fs, root = filesystem(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="module")
def local_tars(tiny_pack, digits_bank, tmp_path_factory):
    """The same run written to a local folder: the bytes a URL run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "run"
    run_generate(GenerateConfig(n=24, out=out, pack=tiny_pack, bank=digits_bank, sampler="ddim", steps=2,
                                shard_size=10, batch=8, dtype="fp32", progress=False))
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def url_tars(url: str) -> dict[str, bytes]:
    fs, root = filesystem(url)
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.glob(f"{root}/*.tar"))}


def read_back(url: str) -> list[dict]:
    """Every sample of the URL run, read with webdataset from the tar bytes fetched through fsspec."""
    samples = []
    for data in url_tars(url).values():
        stream = [{"url": "mem", "stream": io.BytesIO(data)}]
        samples += list(wds.tariterators.tar_file_expander(stream))
    grouped = wds.tariterators.group_by_keys(iter(samples))
    return list(grouped)


def test_generate_into_memory_url_reads_back_and_verifies(gen_kwargs, mem_url, local_tars, tmp_path):
    summary = run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}, staging=tmp_path / "staging"))
    assert summary.complete and summary.images == 24 and summary.shards_written == [0, 1, 2]
    samples = read_back(mem_url)
    assert len(samples) == 24 and samples[0]["__key__"] == "00000000000"
    assert all(int(s["cls"]) == json.loads(s["json"])["label"] for s in samples)
    assert url_tars(mem_url) == local_tars  # the same bytes as a local run
    dataset = json.loads(UrlFolder(mem_url).read("dataset.json"))
    assert dataset["complete"] and dataset["totals"]["samples"] == 24
    assert "out" not in dataset["identity"]  # where a run lives is not part of what it is
    assert sorted(UrlFolder(mem_url).files()) == sorted(
        ["dataset.json", "wids-index.json", "README.md", "preview.png"]
        + [f"{k:06d}.{ext}" for k in range(3) for ext in ("tar", "idx", "stats.json")])
    assert list((tmp_path / "staging").iterdir()) == []  # staged shards are deleted once uploaded
    report = verify_run(mem_url)
    assert report.ok, report.problems
    assert report.samples == 24 and report.shards_checked == 3
    grid = make_preview(mem_url, tmp_path / "grid.png", per_class=2)
    assert grid.stat().st_size > 0


def test_file_url_resume_skips_committed_shards(gen_kwargs, tmp_path, local_tars):
    folder = tmp_path / "via-url"
    url = f"file://{folder}"
    first = run_generate(GenerateConfig(**{**gen_kwargs, "out": url, "shards": "1:2"}))
    assert first.shards_written == [1] and not first.complete
    committed = (folder / "000001.tar").stat().st_mtime_ns
    rest = run_generate(GenerateConfig(**{**gen_kwargs, "out": url, "batch": 5}))
    assert rest.shards_written == [0, 2] and rest.shards_skipped == 1 and rest.complete
    assert (folder / "000001.tar").stat().st_mtime_ns == committed  # never rewritten
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))} == local_tars
    assert not list(folder.glob("*.tmp"))
    assert verify_run(url).ok
    assert verify_run(folder).ok  # the same folder, read as a local path


def test_crash_between_tar_and_stats_upload_then_rerun(gen_kwargs, mem_url, local_tars, monkeypatch):
    real_upload = UrlFolder._upload

    def crash_before_stats_of_shard_1(folder, local, name):
        if name == "000001.stats.json":
            raise ConnectionError("network lost")  # the tar of shard 1 is up, its done marker is not
        real_upload(folder, local, name)

    monkeypatch.setattr(UrlFolder, "_upload", crash_before_stats_of_shard_1)
    with pytest.raises(ConnectionError):
        run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}))
    names = UrlFolder(mem_url).files()
    assert "000001.tar" in names and "000001.stats.json" not in names
    assert set(UrlFolder(mem_url).committed()) == {0}
    assert not verify_run(mem_url).ok  # a tar without its stats file is reported, never trusted

    monkeypatch.setattr(UrlFolder, "_upload", real_upload)
    summary = run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}))
    assert summary.shards_written == [1, 2] and summary.complete
    assert url_tars(mem_url) == local_tars
    assert verify_run(mem_url).ok


def test_a_tar_that_does_not_match_its_stats_is_not_committed(gen_kwargs, mem_url, local_tars):
    run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}))
    fs, root = filesystem(mem_url)
    fs.pipe_file(f"{root}/000002.tar", local_tars["000002.tar"][:1024])  # truncated behind our back
    assert set(UrlFolder(mem_url).committed()) == {0, 1}
    summary = run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}))
    assert summary.shards_written == [2] and url_tars(mem_url) == local_tars


def test_a_shard_committed_by_another_writer_is_not_uploaded_again(gen_kwargs, mem_url, monkeypatch):
    run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}))
    uploads = []
    monkeypatch.setattr(UrlFolder, "_upload", lambda folder, local, name: uploads.append(name))
    before = url_tars(mem_url), UrlFolder(mem_url).read("000000.stats.json")
    # A late second writer of shard 0: publish re-checks the commit and touches nothing.
    assert UrlFolder(mem_url).publish(Path("/nonexistent-staging"), 0) is False
    assert uploads == [] and (url_tars(mem_url), UrlFolder(mem_url).read("000000.stats.json")) == before


def test_other_configuration_is_refused_on_a_url_too(gen_kwargs, mem_url):
    run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url, "shards": "0:1"}))
    with pytest.raises(UsageError, match=r"different configuration \(steps: 2 -> 3"):
        run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url, "steps": 3}))
    summary = run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url, "steps": 3, "overwrite": True}))
    assert summary.shards_written == [0, 1, 2] and verify_run(mem_url).ok


def no_s3fs(monkeypatch) -> None:
    """Make `import s3fs` fail as it does where s3fs is not installed (whether or not it is here)."""
    registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is the read-only mapping

    monkeypatch.delitem(registry._registry, "s3", raising=False)  # a backend class fsspec already imported
    monkeypatch.setitem(sys.modules, "s3fs", None)


def test_missing_backend_names_the_package(gen_kwargs, monkeypatch):
    no_s3fs(monkeypatch)
    with pytest.raises(UsageError, match=r"s3://bucket/run: s3:// run folders need the s3fs package: pip install s3fs"):
        GenerateConfig(**{**gen_kwargs, "out": "s3://bucket/run"})
    with pytest.raises(UsageError, match="fsspec knows no nosuchfs:// file system"):
        GenerateConfig(**{**gen_kwargs, "out": "nosuchfs://bucket/run"})


def test_missing_s3fs_is_a_clear_cli_error(monkeypatch, capsys):
    no_s3fs(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["synthgen", "verify", "s3://bucket/run"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "s3://bucket/run: s3:// run folders need the s3fs package: pip install s3fs" in err


def test_ray_executor_with_a_process_local_memory_url_is_refused(gen_kwargs, mem_url):
    with pytest.raises(UsageError, match="memory:// folders exist in one process"):
        GenerateConfig(**{**gen_kwargs, "out": mem_url}, executor="ray")


def test_plain_paths_stay_paths(gen_kwargs, tmp_path):
    assert GenerateConfig(**{**gen_kwargs, "out": str(tmp_path / "x")}).out == tmp_path / "x"
    assert not is_remote("C://windows/drive") and is_remote("file:///tmp/x")


def test_cleanup_touches_only_the_jobs_own_shard_range(mem_url):
    fs, root = filesystem(mem_url)
    for name in ("000000.tar.abc.tmp", "000001.tar", "000005.tar.def.tmp", "000005.tar", "dataset.json.x.tmp"):
        fs.pipe_file(f"{root}/{name}", b"partial")
    removed = UrlFolder(mem_url).remove_uncommitted((0, 2))  # a job with --shards 0:2
    assert sorted(removed) == [f"{mem_url}/000000.tar.abc.tmp", f"{mem_url}/000001.tar"]
    removed = UrlFolder(mem_url).remove_uncommitted(None)  # a run over every shard
    assert sorted(removed) == [f"{mem_url}/{n}" for n in ("000005.tar", "000005.tar.def.tmp", "dataset.json.x.tmp")]


def test_verify_downloads_each_shard_once(gen_kwargs, mem_url, monkeypatch):
    run_generate(GenerateConfig(**{**gen_kwargs, "out": mem_url}))
    fs, _ = filesystem(mem_url)
    fetched, real = [], type(fs).get_file

    def counting(self, rpath, lpath, *args, **kwargs):
        fetched.append(rpath.rsplit("/", 1)[-1])
        return real(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(type(fs), "get_file", counting)
    assert verify_run(mem_url).ok  # shards, their indexes and the wids index all checked
    assert sorted(fetched) == ["000000.tar", "000001.tar", "000002.tar"]
