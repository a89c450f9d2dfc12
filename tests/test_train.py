"""Training inside the package: plumbing-sized runs of every trainer (the study: test_study.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from synthgen.config import GenerateConfig
from synthgen.errors import UsageError
from synthgen.pipeline import run_generate
from synthgen.train.classifier import ClassifierConfig, evaluate, load_classifier, save_classifier, train_classifier
from synthgen.train.data import load_images, load_shards
from synthgen.train.denoiser import DenoiserTrainConfig, train_denoiser
from synthgen.train.encoder import nt_xent
from synthgen.train.packs import build_pack_from_scratch, default_configs
from synthgen.verify import verify_run


@pytest.fixture(scope="session")
def quick_pack(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "digits"
    enc, den = default_configs(quick=True)
    report = build_pack_from_scratch("builtin:digits:train", out, enc, den, probe="builtin:digits:test",
                                     progress=False)
    assert 0.0 <= report["knn_top1"] <= 1.0
    return out


def test_pack_built_from_scratch_generates(quick_pack, tmp_path):
    log = json.loads((quick_pack / "training.json").read_text())
    assert {"encoder", "denoiser", "report"} <= set(log)
    cfg = GenerateConfig(n=12, out=tmp_path / "run", pack=quick_pack, steps=3, guidance=2.0, shard_size=6,
                         progress=False)
    assert run_generate(cfg).complete and verify_run(cfg.out).ok
    data = load_shards(str(cfg.out), 16)
    assert len(data) == 12 and data.class_names == [str(i) for i in range(10)]


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(8, 16), 0.1)


def test_denoiser_checkpoint_resumes_at_its_step(tmp_path):
    data = load_images("builtin:digits:test", 8)
    conds = torch.randn(len(data), 16)
    cfg = DenoiserTrainConfig(steps=6, hidden=32, depth=1, heads=2, batch=8, checkpoint_every=3)
    from synthgen.train.packs import PIXEL_SCHEDULE

    first, history = train_denoiser(data, conds, PIXEL_SCHEDULE, cfg, tmp_path / "ckpt", progress=False)
    assert json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["step"] == 6
    again, history2 = train_denoiser(data, conds, PIXEL_SCHEDULE, cfg, tmp_path / "ckpt", progress=False)
    assert history2 == []  # nothing left to do
    for a, b in zip(first.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(UsageError, match="another config"):
        train_denoiser(data, conds, PIXEL_SCHEDULE, replace(cfg, lr=1e-2), tmp_path / "ckpt", progress=False)


def test_classifier_on_real_digits_beats_chance_and_round_trips(tmp_path):
    train, test = load_images("builtin:digits:train", 16), load_images("builtin:digits:test", 16)
    config = ClassifierConfig(steps=40, batch=64, input_size=16, width=8)
    model, history = train_classifier(train, config, val=test, progress=False)
    result = evaluate(model, test, 16)
    assert result["top1"] > 0.3 and result["top5"] >= result["top1"] and len(result["per_class"]) == 10
    save_classifier(model, config, train.class_names, tmp_path / "clf", history)
    loaded, loaded_config, names = load_classifier(tmp_path / "clf")
    assert loaded_config == config and evaluate(loaded, test, 16)["top1"] == result["top1"]
