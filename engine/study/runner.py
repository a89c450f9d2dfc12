"""`synthgen study`: the training value of synthetic data, measured from scratch and resumably.

    packs (the shipped default, or trained here with its recipe) ─► splits ─► per regime:
      labelled images ─► their bank ─► generate runs (one per generator, mode and filter)
      ─► one classifier per (arm, size, seed), trained to convergence on the holdout, scored on test
    ─► OUT/study.json, study.md, study.png (report.py)

Everything lands in OUT as it is made (packs, banks, run folders, one JSON row per classifier), so an
interrupted study resumes where it stopped and a finished one rebuilds its report without training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from synthgen.errors import UsageError
from synthgen.options import BUILTIN_SETS
from synthgen.study.data import StudySplits, bank_rows, labelled_images, load_splits, perturb_scale, write_class_folder
from synthgen.study.protocol import Arm, Regime, StudyScale, study_arms
from synthgen.study.report import write_report
from synthgen.train.data import ImageSet, concat_sets, load_shards, subset


@dataclass(frozen=True)
class StudyPacks:
    rep: Path  # the representation-conditioned pack the synthetic arms use (the default: distilled)
    teacher: Path  # its undistilled teacher: the class-conditioned baseline copies its recipe and budget


def run_study(dataset: str, out: Path, scale: StudyScale, regimes: tuple[str, ...] | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study of builtin:DATASET into `out`; returns the report's document.

    `regimes`: names of the scale's regimes to train now (default all); the report covers every row on disk.
    """
    if dataset not in BUILTIN_SETS:
        raise UsageError(f"--dataset {dataset!r} is not one of {', '.join(BUILTIN_SETS)}")
    unknown = set(regimes or ()) - {r.name for r in scale.regimes}
    if unknown:
        raise UsageError(f"--regime {sorted(unknown)[0]!r} is not one of {', '.join(r.name for r in scale.regimes)}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    packs = prepare_packs(dataset, out / "packs", scale, log)
    size = _image_size(packs.rep)
    splits = load_splits(dataset, size, scale.holdout, scale.seed)
    lam = perturb_scale(packs.rep / "bank", scale.perturb_fraction)
    log(f"{dataset}: {len(splits.pool)} pool / {len(splits.holdout)} holdout / {len(splits.test)} test images "
        f"at {size} px; perturb lambda {lam:.4f}")
    sizes = {}
    for regime in scale.regimes:
        labelled = labelled_images(splits, regime, scale.seed)
        sizes[regime.name] = len(labelled)
        if not regimes or regime.name in regimes:
            _run_regime(regime, labelled, splits, packs, lam, scale, out, size, log)
    setup = {"dataset": dataset, "image_size": size, "perturb_lambda": lam, "packs": packs_info(packs, out),
             "splits": {"pool": len(splits.pool), "holdout": len(splits.holdout), "test": len(splits.test)},
             "labelled": sizes, "seconds_this_invocation": round(time.perf_counter() - t0, 1)}
    doc = write_report(out, scale, setup)
    log(f"wrote {out / 'study.md'}, {out / 'study.json'} and {out / 'study.png'}")
    return doc


def _run_regime(regime: Regime, labelled: ImageSet, splits: StudySplits, packs: StudyPacks, lam: float,
                scale: StudyScale, out: Path, size: int, log: Callable[[str], None]) -> None:
    from synthgen.train.classifier import ClassifierConfig, evaluate, train_classifier

    arms = study_arms(scale, regime)
    work = [(arm, m, s) for arm in arms for m in arm.multiples(regime) for s in range(scale.seeds)]
    done = sum(_row_path(out, regime, arm, m, s).is_file() for arm, m, s in work)
    log(f"[{regime.name}] {len(labelled)} labelled images; {len(work)} classifiers, {done} done before")
    runs: dict[str, ImageSet] = {}
    for i, (arm, multiple, seed) in enumerate(work, 1):
        path = _row_path(out, regime, arm, multiple, seed)
        if path.is_file():
            continue
        parts = [labelled] if arm.real else []
        if arm.synthetic:
            if arm.run_name not in runs:
                need = max(m for a in arms if a.run_name == arm.run_name for m in a.multiples(regime))
                runs[arm.run_name] = _generate(regime, arm, need * len(labelled), labelled, packs, lam, scale,
                                               out, size, log)
            images = runs[arm.run_name]
            parts.append(subset(images, range(min(len(images), multiple * len(labelled)))))
        data = concat_sets(parts)
        config = ClassifierConfig(**{**scale.classifier, "aug": arm.aug, "seed": seed})
        start = time.perf_counter()
        model, history = train_classifier(data, config, holdout=splits.holdout, progress=False)
        result = evaluate(model, splits.test, config.input_size)
        last = history[-1]
        row = {"regime": regime.name, "arm": arm.name, "multiple": multiple, "seed": seed,
               "real_images": len(labelled) if arm.real else 0,
               "synthetic_images": len(data) - (len(labelled) if arm.real else 0),
               "top1": result["top1"], "top5": result["top5"], "per_class": result["per_class"],
               "holdout_top1": last["best_holdout_top1"], "steps": last["step"], "best_step": last["best_step"],
               "stopped": last["stopped"], "seconds": round(time.perf_counter() - start, 1),
               "classifier": asdict(config), "run": arm.run_name if arm.synthetic else None}
        _write_json(path, row)
        log(f"[{regime.name}] {i}/{len(work)} {arm.name} x{multiple} seed {seed}: top-1 {row['top1']:.4f} "
            f"({row['steps']} steps, best at {row['best_step']}, {row['seconds']:.0f} s)")


def _generate(regime: Regime, arm: Arm, n: int, labelled: ImageSet, packs: StudyPacks, lam: float,
              scale: StudyScale, out: Path, size: int, log: Callable[[str], None]) -> ImageSet:
    """The arm's generate run grown to `n` images (resumed when it exists), read back into memory."""
    from synthgen.config import GenerateConfig
    from synthgen.pipeline import run_generate

    fields = dict(n=n, out=out / "runs" / regime.name / arm.run_name, seed=scale.seed + 1, progress=False,
                  mode=arm.mode, lam=lam if arm.mode == "perturb" else 0.0, keep_top=arm.keep_top)
    if arm.generator == "rep":
        bank = bank_rows(packs.rep / "bank", labelled.keys, out / "banks" / regime.name)
        fields |= dict(pack=packs.rep, bank=bank)
    else:
        sampler, steps = scale.class_sampler
        fields |= dict(pack=class_pack(regime, labelled, packs, scale, out, log), sampler=sampler, steps=steps)
    summary = run_generate(GenerateConfig(**fields))
    if not summary.range_complete:
        raise UsageError(f"the study's run {fields['out']} ended short of {n} images; see its dataset.json")
    record = fields["out"].with_suffix(".json")
    if summary.shards_written or not record.is_file():  # a resumed, complete run keeps its first timing
        _write_json(record, {"regime": regime.name, "run": arm.run_name, "images": summary.images,
                             "candidates": summary.candidates, "seconds": round(summary.seconds, 2),
                             "images_per_second": round(summary.images_per_second, 1),
                             "options": {k: str(v) for k, v in fields.items() if k not in ("out", "progress")}})
    log(f"[{regime.name}] generate {arm.run_name}: " + (f"{summary.images} images at {summary.images_per_second:.0f} "
                                                        "img/s" if summary.shards_written else f"{n} images already there"))
    return load_shards(str(fields["out"]), size, limit=n)


def class_pack(regime: Regime, labelled: ImageSet, packs: StudyPacks, scale: StudyScale, out: Path,
               log: Callable[[str], None]) -> Path:
    """The class-conditioned baseline of a regime: the teacher's DiT, schedule and budget, trained on the
    regime's labelled images (a class-conditioned model needs labels; it cannot use the unlabelled ones)."""
    from synthgen.train.denoiser import DenoiserTrainConfig
    from synthgen.train.packs import train_denoiser_into_pack

    path = out / "packs" / f"class-{regime.name}"
    if (path / "pack.json").is_file() and (path / "denoiser.safetensors").is_file():
        return path
    log_path = packs.teacher / "training.json"
    recipe = json.loads(log_path.read_text()).get("denoiser", {}).get("config") if log_path.is_file() else None
    if recipe is None:
        raise UsageError(f"{packs.teacher} has no training.json with its denoiser recipe: the class-conditioned "
                         "baseline copies that recipe")
    den = replace(DenoiserTrainConfig(**recipe), cond="class")
    if scale.class_pack_steps is not None:
        den = replace(den, steps=scale.class_pack_steps, checkpoint_every=scale.class_pack_steps)
    images = write_class_folder(labelled, out / "data" / regime.name)
    log(f"[{regime.name}] training the class-conditioned baseline on {len(labelled)} labelled images "
        f"({den.steps} steps)")
    return train_denoiser_into_pack(packs.teacher, str(images), None, den, out=path, progress=False)


def prepare_packs(dataset: str, root: Path, scale: StudyScale, log: Callable[[str], None]) -> StudyPacks:
    """digits: the shipped default pack and its teacher. Other sets: the same recipe trained here on the
    set's train split (`train default-pack`), then distilled to one step as the default pack was."""
    from synthgen.pack import DEFAULT_PACK, DEFAULT_TEACHER

    if dataset == "digits":
        return StudyPacks(DEFAULT_PACK, DEFAULT_TEACHER)
    from synthgen.sources import builtin_labels
    from synthgen.train.distill import DistillConfig, distill_pack
    from synthgen.train.packs import build_pack_from_scratch, default_configs

    teacher, rep = root / f"{dataset}-teacher", root / dataset
    if not (teacher / "training.json").is_file() or "report" not in json.loads((teacher / "training.json").read_text()):
        log(f"training the {dataset} teacher pack with the default pack's recipe (train default-pack)")
        enc, den = default_configs(scale.quick, images=len(builtin_labels(f"builtin:{dataset}:train")))
        build_pack_from_scratch(f"builtin:{dataset}:train", teacher, enc, den, probe=f"builtin:{dataset}:test",
                                progress=not scale.quick)
    if not (rep / "pack.json").is_file():
        log(f"distilling the {dataset} teacher to one DDIM step (train distill, as the default pack)")
        config = (DistillConfig(steps=1, teacher_steps=2, iterations=5, batch=8, pool=32, pool_steps=2)
                  if scale.quick else DistillConfig(steps=1))
        distill_pack(teacher, rep, config, None, "cpu", log=log)
    return StudyPacks(rep, teacher)


def packs_info(packs: StudyPacks, out: Path) -> dict:
    """Each pack's hash, what it was distilled from, and where it is, named so the report reads the same on
    any machine: inside the study folder, or inside the package (the shipped packs)."""
    from synthgen.pack import DEFAULT_PACK, pack_hash, read_pack_config

    info = {}
    for role, path in (("rep", packs.rep), ("teacher", packs.teacher)):
        config = read_pack_config(path)
        info[role] = {"path": _where(path, {"OUT": out, "synthgen": DEFAULT_PACK.parent}),
                      "hash": pack_hash(config), "distilled": config.distilled or None}
    return info


def _where(path: Path, roots: dict[str, Path]) -> str:
    for name, root in roots.items():
        if path.resolve().is_relative_to(root.resolve()):
            return f"{name}/{path.resolve().relative_to(root.resolve()).as_posix()}"
    return str(path)


def _image_size(pack: Path) -> int:
    from synthgen.pack import read_pack_config

    return read_pack_config(pack).image_size


def _row_path(out: Path, regime: Regime, arm: Arm, multiple: int, seed: int) -> Path:
    slug = arm.name.replace(" + ", "+").replace(", ", "-").replace(" ", "-")
    return out / "rows" / regime.name / f"{slug}-x{multiple}-seed{seed}.json"


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
