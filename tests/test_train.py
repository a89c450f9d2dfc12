"""Training inside the package: plumbing-sized runs of every trainer and of the comparison bench."""

from __future__ import annotations

import importlib.util
import json
import sys
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


def test_comparison_bench_plumbing(quick_pack, tmp_path):
    """The reduced study CI runs: every arm trains and scores; real data and the shipped pack beat chance."""
    from synthgen.pack import DEFAULT_TEACHER as DEFAULT_PACK  # the study samples with the teacher's settings

    path = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare", path)
    compare = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = compare  # dataclasses look their module up there
    spec.loader.exec_module(compare)
    rep = DEFAULT_PACK if (DEFAULT_PACK / "denoiser.safetensors").is_file() else quick_pack
    # The class-conditioned baseline is trained here with the quick (30-step) budget: plumbing only.
    doc = compare.run(tmp_path / "cmp", quick=True, seeds=1, steps=80, rep_pack=rep, class_pack=None)
    rows = {r["name"]: r for r in doc["results"]}
    assert len(rows) == 5 and all(0.0 <= r["mean"] <= 1.0 for r in rows.values())
    assert rows["real"]["mean"] > 0.5
    assert all(r["train_images"] > 0 for r in rows.values())
    if rep == DEFAULT_PACK:  # well above chance (0.1); the quality bar itself is tracked by the full study
        assert rows["rep reuse 10x"]["mean"] > 0.3
    assert (tmp_path / "cmp" / "compare.md").read_text().count("|") > 20

    # --only reruns replace their rows in the previous study, in study order, and refuse other setups.
    update = {**doc, "results": [{**rows["real"], "mean": -1.0}], "seconds": 1.0,
              "min_score_taus": tuple(doc["min_score_taus"])}  # a fresh run holds a tuple, the file a list
    stored = json.loads(json.dumps(doc))
    merged = compare.merge_rows(stored, update, [r["name"] for r in doc["results"]])
    assert [r["name"] for r in merged["results"]] == [r["name"] for r in doc["results"]]
    assert merged["results"][0]["mean"] == -1.0 and merged["merged_runs"] == 2
    with pytest.raises(SystemExit, match="seeds differs"):
        compare.merge_rows(stored, {**update, "seeds": 3}, [])
