"""Every reader opens a finished run folder as it is: webdataset, wids (the folder's wids-index.json), DALI
(the NNNNNN.idx beside each tar) and Hugging Face datasets (the dataset card's configs); the classifier
trains through each; verify checks the indexes; the card describes what the folder holds."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthgen.card import render_card, size_category
from synthgen.config import GenerateConfig
from synthgen.indexes import WIDS_INDEX, dali_index, parse_dali_index, tar_members
from synthgen.pack import read_pack_config
from synthgen.pipeline import run_generate
from synthgen.readers import LOADERS, read_samples
from synthgen.shards import index_name, shard_path
from synthgen.train.data import load_shards
from synthgen.verify import verify_run

pytest.importorskip("wids")
pytest.importorskip("nvidia.dali")


def committed_keys(run_dir: Path) -> list[str]:
    """The keys dataset.json's shards hold, in order (keys are shard * 1e5 + index)."""
    doc = json.loads((run_dir / "dataset.json").read_text())
    return [f"{int(k):06d}{i:05d}" for k in sorted(doc["shards"], key=int) for i in range(doc["shards"][k]["count"])]


@pytest.fixture
def run(gen_kwargs):
    run_generate(GenerateConfig(**gen_kwargs))
    return gen_kwargs["out"]


@pytest.mark.parametrize("loader", LOADERS)
def test_each_reader_reads_exactly_the_committed_samples(run, loader):
    # A tar no commit covers (another writer's, half copied) is never read: readers go by dataset.json.
    shutil.copy(shard_path(run, 0), run / "000007.tar")
    samples = list(read_samples(run, loader))
    assert [s.key for s in samples] == committed_keys(run) and len(samples) == 24
    reference = list(read_samples(run, "webdataset"))
    assert samples == reference  # same keys, labels and image bytes, in the same order


def test_hf_datasets_opens_the_folder_through_its_card(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(run), cache_dir=str(tmp_path / "hf"))["train"]
    assert sorted(ds["__key__"]) == committed_keys(run)
    assert [int(c) for c in ds["cls"]] == [s.label for s in read_samples(run)]


def test_dali_indexes_are_what_dalis_own_tool_writes(run, tmp_path):
    tool = Path(sys.executable).with_name("wds2idx")
    for k in range(3):
        mine = (run / index_name(k)).read_bytes()
        assert mine == dali_index(tar_members(shard_path(run, k)))
        assert len(parse_dali_index(mine)) == json.loads((run / f"{k:06d}.stats.json").read_text())["count"]
        if tool.exists():
            subprocess.run([str(tool), str(shard_path(run, k)), str(tmp_path / "ref.idx")], check=True,
                           capture_output=True)
            assert (tmp_path / "ref.idx").read_bytes() == mine


def test_a_resumed_run_writes_the_indexes_a_fresh_run_writes(gen_kwargs, tmp_path):
    fresh = {**gen_kwargs, "out": tmp_path / "fresh"}
    resumed = {**gen_kwargs, "out": tmp_path / "resumed"}
    run_generate(GenerateConfig(**fresh))
    run_generate(GenerateConfig(**resumed, shards="1:2"))
    partial = json.loads((resumed["out"] / WIDS_INDEX).read_text())
    assert [s["url"] for s in partial["shardlist"]] == ["000001.tar"]  # the index follows the commits
    run_generate(GenerateConfig(**resumed))
    for name in ["000000.idx", "000001.idx", "000002.idx"]:
        assert (fresh["out"] / name).read_bytes() == (resumed["out"] / name).read_bytes(), name
    strip = lambda p: {**json.loads(p.read_text()), "name": None}  # noqa: E731 - the folder's name differs
    assert strip(fresh["out"] / WIDS_INDEX) == strip(resumed["out"] / WIDS_INDEX)
    assert verify_run(resumed["out"]).ok


def test_verify_catches_a_truncated_tar_through_its_index(run):
    data = shard_path(run, 1).read_bytes()
    shard_path(run, 1).write_bytes(data[: len(data) // 2])
    problems = verify_run(run).problems
    assert any(p.startswith("000001.idx:") and "truncated" in p for p in problems), problems


def test_verify_names_a_missing_index_and_a_wrong_wids_index_and_resume_repairs_them(run, gen_kwargs):
    (run / index_name(2)).unlink()
    doc = json.loads((run / WIDS_INDEX).read_text())
    doc["shardlist"] = doc["shardlist"][:1]
    (run / WIDS_INDEX).write_text(json.dumps(doc))
    problems = verify_run(run).problems
    assert any(p.startswith("000002.idx: missing") for p in problems)
    assert any(p.startswith(f"{WIDS_INDEX}: lists 1 shard") for p in problems)
    run_generate(GenerateConfig(**gen_kwargs))  # nothing to generate; the run files are rebuilt
    assert verify_run(run).ok


def test_the_classifier_trains_on_the_same_samples_through_every_loader(run):
    sets = {loader: load_shards(str(run), 8, loader=loader) for loader in LOADERS}
    ref = sets["webdataset"]
    for loader, data in sets.items():
        assert data.keys == ref.keys and torch.equal(data.labels, ref.labels), loader
        assert torch.equal(data.images, ref.images), loader
    assert ref.class_names == json.loads((run / "dataset.json").read_text())["class_names"]


def test_train_classifier_cli_takes_a_loader(run, tmp_path):
    from typer.testing import CliRunner

    from synthgen.cli import app

    args = ["train", "classifier", "--train", str(run), "--steps", "2", "--input-size", "8", "--width", "4"]
    result = CliRunner().invoke(app, [*args, "--loader", "dali", "--out", str(tmp_path / "clf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "clf").is_dir()
    result = CliRunner().invoke(app, [*args, "--loader", "tfrecord", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "webdataset, wids, dali" in str(result.exception)


def test_the_card_is_a_hub_card_written_from_the_committed_stats(run, tiny_pack):
    text = (run / "README.md").read_text()
    header = text.split("---\n")[1]
    assert 'path: "*.tar"' in header and "- image-classification" in header and "- n<1K" in header
    doc = json.loads((run / "dataset.json").read_text())
    for name, count in doc["per_class_counts"].items():
        assert f"| {name} | {count} |" in text
    assert "ddim, 2 steps" in text and "![preview](preview.png)" in text and (run / "preview.png").is_file()
    licensed = dataclasses.replace(read_pack_config(tiny_pack), license="apache-2.0")
    assert 'license: "apache-2.0"' in render_card(doc, licensed, has_preview=False)
    assert [size_category(n) for n in (999, 1000, 250_000, 10**9)] == ["n<1K", "1K<n<10K", "100K<n<1M", "n>1B"]


def test_overwrite_removes_the_run_files_with_the_shards(run, gen_kwargs):
    run_generate(GenerateConfig(**{**gen_kwargs, "n": 5, "overwrite": True}))
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert names == ["000000.idx", "000000.stats.json", "000000.tar", "README.md", "dataset.json", "preview.png",
                     WIDS_INDEX]
