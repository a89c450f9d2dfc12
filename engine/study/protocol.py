"""The training-value study's protocol as data: regimes, arms, budgets, at full size and at CI size.

A regime says how many labelled real images there are: the whole train split less the holdout ("full"),
or k per class ("k20", "k5"). The generator never sees a label in any regime: the representation-
conditioned pack learned from every train image without its label, and labels reach the synthetic data only
through the bank, which holds the embeddings of the regime's labelled images. An arm says what a classifier
trains on: the labelled real images (with or without classical augmentation), synthetic images made from
them (a multiple of their number), or both. Every classifier trains to convergence on the same held-out
validation split (train.classifier's plateau schedule) and is scored once on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    name: str
    shots: int | None  # labelled real images per class; None: the train split less the holdout
    multiples: tuple[int, ...]  # synthetic set sizes, as multiples of the labelled real set


@dataclass(frozen=True)
class Arm:
    name: str
    real: bool = False  # the labelled real images are in the training set
    aug: str = "none"  # the classifier's classical augmentation: none | standard
    generator: str | None = None  # "rep": the representation-conditioned pack | "class": class-conditioned
    mode: str = "reuse"  # new conditions from the bank: reuse | perturb | interpolate (plan.py)
    keep_top: float | None = None  # conditioning-space filter: the best fraction of each candidate group
    only: tuple[int, ...] | None = None  # a subset of the regime's multiples (compute); None: all of them

    @property
    def synthetic(self) -> bool:
        return self.generator is not None

    def multiples(self, regime: Regime) -> tuple[int, ...]:
        if not self.synthetic:
            return (0,)
        return tuple(m for m in regime.multiples if self.only is None or m in self.only)

    @property
    def run_name(self) -> str:
        """The generate run this arm reads (arms that differ only in size or real images share one)."""
        top = "" if self.keep_top is None else f"-top{self.keep_top:g}"
        return f"{self.generator}-{self.mode}{top}"


REAL = Arm("real", real=True)
REAL_AUG = Arm("real + aug", real=True, aug="standard")
SYNTHETIC = Arm("synthetic", generator="rep")
REAL_SYNTHETIC = Arm("real + synthetic", real=True, generator="rep")
CLASS_COND = Arm("class-conditioned", generator="class")


def arms(regime: Regime) -> list[Arm]:
    """The arms of a regime. With full labels perturb, interpolate and the filter run at the middle size
    only (variations of reuse, to save compute); with few labels, where new conditions matter most,
    perturb and interpolate run at every size and the filter at the largest. Arms with augmentation
    on synthetic data run at the largest size."""
    middle, largest = (regime.multiples[len(regime.multiples) // 2],), (regime.multiples[-1],)
    few = regime.shots is not None
    return [
        REAL, REAL_AUG, SYNTHETIC,
        Arm("synthetic, perturb", generator="rep", mode="perturb", only=None if few else middle),
        Arm("synthetic, interpolate", generator="rep", mode="interpolate", only=None if few else middle),
        Arm("synthetic, filtered", generator="rep", keep_top=0.5, only=largest if few else middle),
        REAL_SYNTHETIC, CLASS_COND,
        # Classical augmentation on top of synthetic data, the recipe a user would train with: at the largest
        # size, beside the target arms above (which keep augmentation out, to compare it with synthetic data).
        *([] if few else [Arm("synthetic + aug", generator="rep", aug="standard", only=largest)]),
        Arm("real + synthetic + aug", real=True, aug="standard", generator="rep", only=largest),
    ]


@dataclass(frozen=True)
class StudyScale:
    regimes: tuple[Regime, ...]
    seeds: int  # classifier seeds per (arm, size); the synthetic data of a run is generated once
    holdout: float  # fraction of the train split held out (stratified) for every classifier's early stopping
    classifier: dict  # ClassifierConfig fields (the plateau schedule)
    class_pack_steps: int | None  # the class-conditioned denoiser's steps; None: the rep teacher's own budget
    quick: bool = False
    class_sampler: tuple[str, int] = ("dpmpp_2m", 8)  # generous to the baseline: 4x its default steps
    arm_names: tuple[str, ...] | None = None  # None: every arm
    perturb_fraction: float = 0.5  # lambda * sqrt(D) = this x the bank's median nearest-neighbour distance
    seed: int = 0  # holdout, k-shot subsets and generation seeds derive from it


# A ResNet-10-T of base width 16 at 16 px: as accurate as a ResNet-18 of that width on the real digits (one
# seed each, plateau schedule: 99.3 vs 98.7 % top-1) at 1.6-1.8x its training speed on 2 cores.
CLASSIFIER = dict(arch="resnet10t", width=16, input_size=16, batch=128, schedule="plateau", steps=4000,
                  eval_every=100, patience=3, lr_drops=1)

FULL = StudyScale(
    regimes=(Regime("full", None, (1, 5, 10)), Regime("k20", 20, (10, 50)), Regime("k5", 5, (10, 50))),
    seeds=3, holdout=0.15, classifier=CLASSIFIER, class_pack_steps=None,
)

# What CI runs: every kind of arm and both regime kinds, at plumbing size (about a minute on 2 cores).
QUICK = StudyScale(
    regimes=(Regime("full", None, (1,)), Regime("k5", 5, (2,))),
    seeds=1, holdout=0.15, quick=True, class_pack_steps=30, class_sampler=("dpmpp_2m", 2),
    classifier=dict(CLASSIFIER, width=8, steps=60, eval_every=20, patience=1),
    arm_names=("real", "real + aug", "synthetic", "synthetic, interpolate", "synthetic, filtered",
               "real + synthetic", "class-conditioned"),
)


def study_arms(scale: StudyScale, regime: Regime) -> list[Arm]:
    return [a for a in arms(regime) if scale.arm_names is None or a.name in scale.arm_names]
