"""Faults a long run meets: concurrent writers, signals, kill -9, broken inputs, hostile paths and values.

Processes are real subprocesses of `synthgen generate`; each waits for the run to start (a shard lock
appears) before it is signalled or killed, so the faults land while shards are being written.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from synthgen.bank import build_bank, load_bank
from synthgen.cli import app
from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pack import load_pack
from synthgen.pipeline import run_generate
from synthgen.localfolder import LocalFolder, lock_path
from synthgen.runstate import prepare_run
from synthgen.shards import shard_path, stats_path
from synthgen.verify import verify_run

CLI = [sys.executable, "-c", "from synthgen.cli import main; main()", "generate"]
SHARD_LOCKS = "[0-9]*.lock"
MEMBER_RE = re.compile(r"^\d{11}\.(jpg|cls|json)$")


# ---- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_base(tiny_pack, digits_bank):
    """Ten shards of a fraction of a second each: long enough for a fault to land inside a shard."""
    return dict(n=60, pack=tiny_pack, bank=digits_bank, sampler="ddim", steps=6, shard_size=6, batch=3,
                progress=False)


@pytest.fixture
def slow_kwargs(slow_base, tmp_path):
    return {**slow_base, "out": tmp_path / "run"}


def cli_args(kw: dict) -> list[str]:
    args = ["--n", kw["n"], "--out", kw["out"], "--pack", kw["pack"], "--bank", kw["bank"], "--sampler",
            kw["sampler"], "--steps", kw["steps"], "--shard-size", kw["shard_size"], "--batch", kw["batch"],
            "--no-progress"]
    return [str(a) for a in args]


def start(kw: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(CLI + cli_args(kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_first_claim(proc: subprocess.Popen, run_dir, timeout: float = 60.0) -> bool:
    """True once `proc` holds a shard lock (it is generating); False if it exited first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if run_dir.is_dir() and any(_holder(p) == proc.pid for p in run_dir.glob(SHARD_LOCKS)):
            return True
        time.sleep(0.005)
    return False


def _holder(lock) -> int | None:
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None  # gone, or being written


def shard_bytes(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.tar"))}


def committed_files(run_dir) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every committed shard: a rewrite changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_dir.glob("*.tar")
            if stats_path(run_dir, int(p.name[:6])).exists()}


def samples(run_dir) -> list[dict]:
    urls = sorted(str(p) for p in run_dir.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


def assert_clean_and_unrewritten(run_dir, before: dict) -> None:
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(SHARD_LOCKS))
    assert all(stats_path(run_dir, int(p.name[:6])).exists() for p in run_dir.glob("*.tar"))
    after = committed_files(run_dir)
    assert {k: after[k] for k in before} == before, "a committed shard was rewritten"


@pytest.fixture(scope="module")
def reference(slow_base, tmp_path_factory):
    """The uninterrupted run: its shard bytes, and how long generating took (to place faults)."""
    kw = {**slow_base, "out": tmp_path_factory.mktemp("reference") / "run"}
    summary = run_generate(GenerateConfig(**kw))
    return shard_bytes(kw["out"]), summary.seconds


# ---- shard claims ----------------------------------------------------------------------------------


def test_a_claim_is_exclusive_and_released(tmp_path):
    claim = LocalFolder(tmp_path).claim(3)
    assert claim is not None and json.loads(lock_path(tmp_path, 3).read_text())["pid"] == os.getpid()
    assert LocalFolder(tmp_path).claim(3) is None  # flock is per open file: a second claim fails, even in-process
    claim.release()
    assert not lock_path(tmp_path, 3).exists()
    with LocalFolder(tmp_path).claim(3) as again:
        assert again is not None


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    lock_path(tmp_path, 0).write_text(json.dumps({"pid": 999999, "host": "gone", "time": 0}))
    (tmp_path / "000000.tar.tmp").write_bytes(b"half a shard")
    removed = LocalFolder(tmp_path).remove_uncommitted()
    assert sorted(p.name for p in removed) == ["000000.tar.tmp"]
    assert not lock_path(tmp_path, 0).exists()


def test_cleanup_leaves_the_open_shard_of_a_live_writer_alone(tmp_path):
    (tmp_path / "000001.tar.tmp").write_bytes(b"being written")
    (tmp_path / "000002.tar.tmp").write_bytes(b"abandoned")
    with LocalFolder(tmp_path).claim(1):
        assert [p.name for p in LocalFolder(tmp_path).remove_uncommitted()] == ["000002.tar.tmp"]
        assert (tmp_path / "000001.tar.tmp").exists()
    assert [p.name for p in LocalFolder(tmp_path).remove_uncommitted()] == ["000001.tar.tmp"]


def test_overwrite_is_refused_while_another_process_writes(gen_kwargs):
    run_generate(GenerateConfig(**gen_kwargs, shards="0:1"))
    cfg = GenerateConfig(**gen_kwargs, overwrite=True)
    with LocalFolder(cfg.out).claim(1):
        with pytest.raises(UsageError, match=rf"shard 1 is held by pid {os.getpid()}.*stop it first"):
            prepare_run(LocalFolder(cfg.out), cfg, {}, {})
        assert shard_path(cfg.out, 0).exists()


def test_a_held_shard_is_left_to_its_writer_then_redone_when_it_gives_up(gen_kwargs):
    """Another writer holds shard 1: the run does 0 and 2, waits, and writes 1 once the claim is dropped
    without a commit (its writer died)."""
    run_dir = gen_kwargs["out"]
    run_dir.mkdir(parents=True)
    claim = LocalFolder(run_dir).claim(1)
    result = {}
    worker = threading.Thread(target=lambda: result.update(s=run_generate(GenerateConfig(**gen_kwargs))))
    worker.start()
    deadline = time.monotonic() + 60
    while not (stats_path(run_dir, 0).exists() and stats_path(run_dir, 2).exists()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.is_alive() and not shard_path(run_dir, 1).exists()
    claim.release()
    worker.join(60)
    assert sorted(result["s"].shards_written) == [0, 1, 2] and result["s"].complete and verify_run(run_dir).ok


def test_two_processes_on_one_folder_split_the_work(slow_kwargs, reference):
    run_dir = slow_kwargs["out"]
    procs = [start(slow_kwargs) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    written = [int(re.search(r"shards written\s+(\d+)", out).group(1)) for out, _ in outs]
    assert sum(written) == 10, written  # every shard written once, by one of the two
    assert verify_run(run_dir).ok and shard_bytes(run_dir) == reference[0]
    assert not list(run_dir.glob(SHARD_LOCKS))


# ---- signals and kill -9 ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_abandons_the_open_shard_and_says_how_to_resume(slow_kwargs, reference, sig, code):
    run_dir = slow_kwargs["out"]
    proc = start(slow_kwargs)
    assert wait_for_first_claim(proc, run_dir)
    time.sleep(0.2 * reference[1])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Resume with the same command" in err and f"synthgen generate --n 60 --out {run_dir}" in err
    before = committed_files(run_dir)
    assert_clean_and_unrewritten(run_dir, before)
    assert json.loads((run_dir / "dataset.json").read_text())["totals"]["shards_done"] == len(before)
    summary = run_generate(GenerateConfig(**slow_kwargs))
    assert summary.complete and sorted(summary.shards_written) == sorted(set(range(10)) - {int(n[:6]) for n in before})
    assert_clean_and_unrewritten(run_dir, before)
    assert shard_bytes(run_dir) == reference[0]


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(slow_kwargs, reference):
    """Four kill -9 at random points of one run, each restart resuming the last; then finish it."""
    run_dir, rng, landed = slow_kwargs["out"], random.Random(7), 0
    for _ in range(4):
        before = committed_files(run_dir) if run_dir.exists() else {}
        proc = start(slow_kwargs)
        if wait_for_first_claim(proc, run_dir):
            time.sleep(rng.uniform(0, 0.8) * reference[1])
            landed += proc.poll() is None
            proc.kill()
        proc.wait(60)
        assert set(before) <= set(committed_files(run_dir))
        assert {k: committed_files(run_dir)[k] for k in before} == before, "a committed shard was rewritten"
    assert landed >= 3, f"only {landed} kills landed mid-run"
    before = committed_files(run_dir)
    summary = run_generate(GenerateConfig(**slow_kwargs))
    assert summary.complete and verify_run(run_dir).ok
    assert_clean_and_unrewritten(run_dir, before)
    assert shard_bytes(run_dir) == reference[0]
    got = samples(run_dir)
    ids = sorted(json.loads(s["json"])["sample_id"] for s in got)
    assert ids == list(range(60)) and len({s["__key__"] for s in got}) == 60


# ---- broken inputs ---------------------------------------------------------------------------------


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def test_embed_skips_and_counts_corrupt_truncated_and_non_image_inputs(tiny_pack, tmp_path):
    good = _png((200, 30, 30))
    files = {"a/ok1.png": good, "a/ok2.png": _png((10, 200, 10)), "b/ok3.png": _png((9, 9, 200)),
             "a/corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(200), "b/truncated.png": good[: len(good) // 2],
             "b/text.png": b"hello, I am not an image\n", "b/empty.png": b""}
    for name, data in files.items():
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(data)
    summary = build_bank(str(tmp_path / "imgs"), tiny_pack, tmp_path / "bank", progress=False)
    assert summary["embedded"] == 3
    assert sorted(s["key"] for s in summary["skipped"]) == ["a/corrupt", "b/empty", "b/text", "b/truncated"]
    meta = load_bank(tmp_path / "bank").meta
    assert meta["num_skipped"] == 4 and len(meta["skipped"]) == 4 and meta["keys"] == ["a/ok1", "a/ok2", "b/ok3"]


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_embed_reads_shards_with_bad_members_as_data(tiny_pack, tmp_path):
    _tar(tmp_path / "src.tar", {"s1.png": _png((1, 2, 3)), "s1.cls": b"0", "s2.png": b"garbage", "s2.cls": b"1",
                                "s3.png": _png((50, 60, 70)), "s3.cls": b"1"})
    summary = build_bank(str(tmp_path / "src.tar"), tiny_pack, tmp_path / "bank", progress=False)
    assert summary["embedded"] == 2 and [s["key"] for s in summary["skipped"]] == ["s2"]


@pytest.fixture
def good_run(gen_kwargs):
    run_generate(GenerateConfig(**gen_kwargs))
    return gen_kwargs["out"]


def _verify_cli(run_dir):
    return CliRunner().invoke(app, ["verify", str(run_dir)])


def test_verify_fails_on_a_truncated_shard(good_run):
    data = shard_path(good_run, 1).read_bytes()
    shard_path(good_run, 1).write_bytes(data[: len(data) // 3])
    result = _verify_cli(good_run)
    assert result.exit_code == 1 and "000001.tar" in result.output


def test_verify_fails_on_a_tampered_shard_even_with_its_hashes_updated(good_run):
    """Relabel one sample and fix both sha256 records: the label no longer matches its metadata."""
    import hashlib

    path = shard_path(good_run, 0)
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    label = int(members["00000000000.cls"])
    members["00000000000.cls"] = str((label + 1) % 10).encode()
    _tar(path, members)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for doc_path, keys in ((stats_path(good_run, 0), ()), (good_run / "dataset.json", ("shards", "0"))):
        doc = json.loads(doc_path.read_text())
        entry = doc
        for k in keys:
            entry = entry[k]
        entry.update(sha256=sha, bytes=path.stat().st_size)
        doc_path.write_text(json.dumps(doc))
    result = _verify_cli(good_run)
    assert result.exit_code == 1 and "00000000000" in result.output


def test_pickle_renamed_to_safetensors_is_refused_not_unpickled(tiny_pack, tmp_path):
    import shutil

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    torch.save({"x": Boom()}, pack / "denoiser.safetensors")
    doc = json.loads((pack / "pack.json").read_text())
    doc["weights"]["denoiser"].pop("sha256", None)  # a forged pack: no hash to catch the swap
    (pack / "pack.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="denoiser"):
        load_pack(pack)


def test_pickled_bank_is_refused(digits_bank, tmp_path):
    import shutil

    bank = tmp_path / "bank"
    shutil.copytree(digits_bank, bank)
    torch.save({"embeddings": torch.zeros(2, 64)}, bank / "embeddings.safetensors")
    with pytest.raises(UsageError, match="cannot read the embedding bank"):
        load_bank(bank)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(image_size="big"), "malformed"),
    (lambda d: d.update(encoder=[1, 2]), "malformed"),
    (lambda d: d["weights"]["encoder"].update(file="/etc/passwd.safetensors"), "outside the pack folder"),
])
def test_more_malformed_pack_configs(tiny_pack, tmp_path, edit, match):
    import shutil

    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    doc = json.loads((pack / "pack.json").read_text())
    edit(doc)
    (pack / "pack.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=match):
        load_pack(pack)


# ---- hostile paths and values ----------------------------------------------------------------------


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_bank_keys_stay_inside_metadata(tiny_pack, gen_kwargs, tmp_path):
    hostile = {"ok.png": (9, 9, 9), "../../escape.png": (255, 0, 0), "/abs/root.png": (0, 255, 0),
               "a/../../../up.png": (0, 0, 255), "x/y/z.png": (1, 1, 1)}
    members = {}
    for i, (name, color) in enumerate(hostile.items()):
        members[name] = _png(color)
        members[name.rsplit(".", 1)[0] + ".cls"] = str(i % 2).encode()
    (tmp_path / "src").mkdir()
    _tar(tmp_path / "src" / "hostile.tar", members)
    build_bank(str(tmp_path / "src" / "hostile.tar"), tiny_pack, tmp_path / "bank", progress=False)
    before = _tree(tmp_path.parent)
    run_dir = tmp_path / "run"
    run_generate(GenerateConfig(**{**gen_kwargs, "bank": tmp_path / "bank", "n": 6, "out": run_dir}))
    new = _tree(tmp_path.parent) - before
    assert all(p.startswith(f"{tmp_path.name}/run") for p in new), new
    got = samples(run_dir)
    bank_keys = set(load_bank(tmp_path / "bank").keys)
    anchor_keys = {k for s in got for k in json.loads(s["json"])["anchor_keys"]}
    assert anchor_keys and anchor_keys <= bank_keys  # the keys travel as JSON strings, never as names
    with tarfile.open(shard_path(run_dir, 0)) as tar:
        assert all(MEMBER_RE.match(m.name) for m in tar.getmembers())
    assert verify_run(run_dir).ok


@pytest.mark.parametrize("damage", [b'{"shard": 0, "count"', b"\xff\xfe", b"[1, 2]"])
def test_a_damaged_stats_file_means_not_committed_and_resume_redoes_the_shard(gen_kwargs, damage):
    # One commit rule for every folder kind: the stats file parses, names its shard, and records the tar's size.
    cfg = GenerateConfig(**{**gen_kwargs, "n": 20})
    run_generate(cfg)
    reference = shard_path(cfg.out, 0).read_bytes()
    stats_path(cfg.out, 0).write_bytes(damage)
    assert verify_run(cfg.out).problems
    summary = run_generate(cfg)
    assert summary.shards_written == [0] and summary.complete and verify_run(cfg.out).ok
    assert shard_path(cfg.out, 0).read_bytes() == reference


def test_a_tar_whose_size_differs_from_its_stats_is_not_committed(gen_kwargs):
    cfg = GenerateConfig(**{**gen_kwargs, "n": 20})
    run_generate(cfg)
    reference = shard_path(cfg.out, 0).read_bytes()
    shard_path(cfg.out, 0).write_bytes(reference[:-512])  # truncated by a copy that died
    assert run_generate(cfg).shards_written == [0] and verify_run(cfg.out).ok
    assert shard_path(cfg.out, 0).read_bytes() == reference


@pytest.mark.parametrize("field,value", [("format", "../../x"), ("sampler", "../x"), ("device", "/dev/null"),
                                         ("executor", "sh -c"), ("shards", "../1"), ("n", "1/../2")])
def test_hostile_config_values_are_refused(gen_kwargs, field, value):
    with pytest.raises(UsageError, match=f"--{field.replace('_', '-')}"):
        GenerateConfig(**{**gen_kwargs, field: value})


@pytest.mark.parametrize("name", ["run with spaces", "ünïcödé-run", "-dash", "quote'and\"double", "a..b"])
def test_odd_out_names_work_and_stay_put(gen_kwargs, tmp_path, name):
    run_dir = tmp_path / name
    summary = run_generate(GenerateConfig(**{**gen_kwargs, "n": 4, "out": run_dir}))
    assert summary.complete and verify_run(run_dir).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name])
    assert {p.name for p in run_dir.iterdir()} <= {"000000.tar", "000000.idx", "000000.stats.json", "dataset.json",
                                                   "wids-index.json", "README.md", "preview.png", ".run.lock"}
