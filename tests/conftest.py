"""Hermetic fixtures: tiny random packs and a bank of scikit-learn's bundled digits, built once per session."""

from __future__ import annotations

import os
import shutil

# No GPU here: run the Triton kernels in Triton's CPU interpreter. It must be set before any @triton.jit
# decorator runs, i.e. before anything imports synthgen.kernels. Checked without importing torch.
if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: one intra-op thread per process keeps OpenMP from spinning against pytest's own work.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from synthgen.bank import build_bank  # noqa: E402
from synthgen.presets import write_random_pack  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory):
    path = tmp_path_factory.mktemp("packs") / "tiny"
    write_random_pack("tiny", path, seed=0)
    return path


@pytest.fixture(scope="session")
def digits_bank(tiny_pack, tmp_path_factory):
    """The digits test split (450 images) embedded with the tiny pack's encoder."""
    path = tmp_path_factory.mktemp("banks") / "digits"
    build_bank("builtin:digits:test", tiny_pack, path, batch_size=128, progress=False)
    return path


@pytest.fixture
def gen_kwargs(tiny_pack, digits_bank, tmp_path):
    """Small, fast generate options; tests override what they exercise. CPU even where a GPU is visible:
    byte-exact comparisons and the ORT engines are CPU contracts (GPU tests ask for cuda themselves)."""
    return dict(n=24, out=tmp_path / "run", pack=tiny_pack, bank=digits_bank, sampler="ddim", steps=2,
                shard_size=10, batch=8, device="cpu", progress=False)
