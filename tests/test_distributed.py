"""The Ray executor: same shards as a local run, lost actors retried, a clear error without Ray.

The Ray tests start a local 2-CPU Ray once per module (actors take 0.5 CPU each, see ENV-FACTS) and
are skipped where Ray is not installed (pip install 'synthgen[ray]').
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pipeline import run_generate
from synthgen.verify import verify_run


def shard_bytes(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.tar"))}


def test_missing_ray_is_a_clear_usage_error(gen_kwargs, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'synthgen\[ray\]'"):
        run_generate(GenerateConfig(**gen_kwargs, executor="ray"))
    assert not gen_kwargs["out"].exists()


@pytest.mark.parametrize("extra,match", [({"workers": 2}, "--workers 2 needs --executor ray"),
                                         ({"address": "auto"}, "Ray options"),
                                         ({"gpus_per_worker": 1.0}, "Ray options")])
def test_ray_options_without_ray_executor_are_refused(gen_kwargs, extra, match):
    with pytest.raises(UsageError, match=match):
        run_generate(GenerateConfig(**gen_kwargs, **extra))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    # Ray puts the driver's working directory on its workers' sys.path; from the repository root its kernels/
    # folder would shadow the `kernels` package transformers imports (see conftest.py). Start from elsewhere.
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-cwd"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    finally:
        os.chdir(cwd)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_kwargs(gen_kwargs):
    return {**gen_kwargs, "n": 40, "shard_size": 5, "steps": 4, "batch": 5}


@pytest.fixture
def local_reference(ray_kwargs, tmp_path):
    kw = {**ray_kwargs, "out": tmp_path / "local"}
    run_generate(GenerateConfig(**kw))
    return shard_bytes(kw["out"])


def test_ray_run_equals_local_run(ray_cluster, ray_kwargs, local_reference):
    summary = run_generate(GenerateConfig(**ray_kwargs, executor="ray", workers=2))
    assert summary.complete and sorted(summary.shards_written) == list(range(8))
    assert verify_run(ray_kwargs["out"]).ok and shard_bytes(ray_kwargs["out"]) == local_reference


def test_ray_run_into_a_url_folder_equals_local_run(ray_cluster, ray_kwargs, local_reference, tmp_path):
    """A file:// URL takes the object-store path (staging, tar upload, stats last) from every actor."""
    url = f"file://{tmp_path / 'remote'}"
    summary = run_generate(GenerateConfig(**{**ray_kwargs, "out": url}, executor="ray", workers=2))
    assert summary.complete and sorted(summary.shards_written) == list(range(8))
    assert verify_run(url).ok and shard_bytes(tmp_path / "remote") == local_reference
    assert not list((tmp_path / "remote").glob("*.lock"))  # no claims on a URL folder


def test_lost_actor_shard_is_retried_elsewhere(ray_cluster, ray_kwargs, local_reference):
    """kill -9 the first actor seen holding a shard lock; its shard is redone by a replacement actor."""
    run_dir, killed = ray_kwargs["out"], []

    def assassin():
        end = time.monotonic() + 120
        while not killed and time.monotonic() < end:
            for lock in run_dir.glob("[0-9]*.lock") if run_dir.is_dir() else []:
                try:
                    pid = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, lock.name))
                    return
            time.sleep(0.005)

    watcher = threading.Thread(target=assassin, daemon=True)
    watcher.start()
    summary = run_generate(GenerateConfig(**ray_kwargs, executor="ray", workers=2))
    watcher.join(5)
    assert killed, "no actor was killed"
    assert summary.complete and verify_run(run_dir).ok and shard_bytes(run_dir) == local_reference
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob("[0-9]*.lock"))


def test_ray_run_of_an_imported_pack_equals_local_run(ray_cluster, imported_pack, tmp_path):
    pack, bank = imported_pack
    kw = dict(n=12, pack=pack, bank=bank, sampler="ddim", steps=2, shard_size=4, batch=4, device="cpu",
              progress=False, guidance=2.0, null="mean")
    run_generate(GenerateConfig(**kw, out=tmp_path / "local"))
    summary = run_generate(GenerateConfig(**kw, out=tmp_path / "ray", executor="ray", workers=2))
    assert summary.complete and verify_run(tmp_path / "ray").ok
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")
