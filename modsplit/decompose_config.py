"""DecomposeConfig: every setting a decomposition's result depends on, in one dataclass.

decompose() takes it (or the same names as keyword arguments), and its checkpoints store
resume_key(): a resumed run must match every field except those marked resume=False. A new
setting is added here and nowhere else, so it cannot be left out of the resume check.
"""
import dataclasses
import math
from typing import Optional, Tuple

from modsplit.layers import SCORE_INITS
from modsplit.module_norm import BATCHNORM_MODES

# Learning-rate multiplier of epoch e (1-based) out of E, per schedule name.
SCHEDULES = {
    "constant": lambda e, total: 1.0,
    "cosine": lambda e, total: 0.5 * (1.0 + math.cos(math.pi * (e - 1) / total)),
}


def _field(default, resume=True):
    return dataclasses.field(default=default, metadata={"resume": resume})


@dataclasses.dataclass(frozen=True)
class DecomposeConfig:
    """Settings of decompose() (its docstring says what each does).

    density      k, the fraction of each layer's weights a module keeps (0 < k <= 1)
    alpha, p     stemming weight and exponent of Eq. 1 (alpha = 0: no stemming)
    epochs       decomposition epochs (a resumed run may extend it: not part of the resume key)
    lr, graft_lr learning rates of the scores and of the grafting layers
    momentum, nesterov, weight_decay   SGD settings of both parameter groups
    shared_init  one score draw shared by every module (the paper's module stemming init)
    seed         score draw and data order
    lr_schedule  "cosine" (default) or "constant"
    balance      class-weighted cross-entropy (1:1 positive/negative) instead of plain
    classes      class ids to build modules for (None: all)
    neg_ratio    None (default: every module trains on the whole batch, the paper's loss), or r > 0:
                 sampled negatives, each module trains on its positives in the batch plus
                 about r negatives per positive, reweighted so that its loss is an unbiased
                 estimate of the full class-balanced loss (decompose.sample_rows); the work per
                 step of a masked MLP is about (1 + r) B rows instead of K B (other networks
                 pad every module to the rows of the one that draws the most)
    batchnorm    "module" (default): every BatchNorm of the model gets per-module statistics
                 (modsplit.module_norm: batch statistics in the training steps, per-module
                 running statistics everywhere else); "frozen": the base model's statistics
                 for every module (the model's copy stays in eval mode). No effect on a
                 model without BatchNorm.
    score_init   "kaiming" (default, the paper's edge-popup init) or "magnitude": the initial
                 masks are each layer's top-|W| weights (layers.magnitude_scores)
    """
    density: float = _field(0.1)
    alpha: float = _field(1.0)
    p: float = _field(1.0)
    epochs: int = _field(10, resume=False)
    lr: float = _field(0.1)
    graft_lr: float = _field(0.01)
    momentum: float = _field(0.9)
    nesterov: bool = _field(True)
    weight_decay: float = _field(5e-4)
    shared_init: bool = _field(True)
    seed: int = _field(0)
    lr_schedule: str = _field("cosine")
    balance: bool = _field(True)
    classes: Optional[Tuple[int, ...]] = _field(None)
    neg_ratio: Optional[float] = _field(None)
    batchnorm: str = _field("module")
    score_init: str = _field("kaiming")

    @classmethod
    def build(cls, config, num_classes: int, **settings) -> "DecomposeConfig":
        """`config` (or the defaults) with `settings` replacing its fields, classes resolved to a
        tuple of ids of [0, num_classes), and every field checked (ValueError naming it)."""
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise TypeError(f"modsplit: config must be a DecomposeConfig, got "
                            f"{type(base).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"modsplit: decompose() got unknown settings {unknown}; "
                            f"DecomposeConfig has {sorted(names)}")
        cfg = dataclasses.replace(base, **settings)
        classes = (tuple(range(num_classes)) if cfg.classes is None
                   else tuple(int(c) for c in cfg.classes))
        cfg = dataclasses.replace(cfg, classes=classes)
        cfg.check(num_classes)
        return cfg

    def check(self, num_classes: int):
        """Raise ValueError naming the first bad field."""
        c = self.classes
        if not c or len(set(c)) != len(c) or not all(0 <= k < num_classes for k in c):
            raise ValueError(f"modsplit: classes must be distinct ids in [0, {num_classes}), got "
                             f"{c}")
        if not 0 < self.density <= 1:
            raise ValueError(f"modsplit: density must be in (0, 1], got {self.density}")
        if self.epochs < 1:
            raise ValueError(f"modsplit: epochs must be >= 1, got {self.epochs}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"modsplit: lr_schedule must be one of {sorted(SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        if self.neg_ratio is not None and not (isinstance(self.neg_ratio, (int, float))
                                               and math.isfinite(self.neg_ratio)
                                               and self.neg_ratio > 0):
            raise ValueError(f"modsplit: neg_ratio must be None or a finite number > 0, got "
                             f"{self.neg_ratio!r}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"modsplit: batchnorm must be one of {BATCHNORM_MODES}, got "
                             f"{self.batchnorm!r}")
        if self.score_init not in SCORE_INITS:
            raise ValueError(f"modsplit: score_init must be one of {SCORE_INITS}, got "
                             f"{self.score_init!r}")
        if self.alpha < 0 or self.p <= 0:
            raise ValueError(f"modsplit: alpha must be >= 0 and p > 0, got alpha {self.alpha}, "
                             f"p {self.p}")

    def to_dict(self) -> dict:
        """Every field, JSON-ready (classes as a list)."""
        d = dataclasses.asdict(self)
        d["classes"] = None if self.classes is None else list(self.classes)
        return d

    def resume_key(self, num_classes: int) -> dict:
        """What a checkpoint stores and a resume must match: every field marked resume=True,
        plus num_classes."""
        d = self.to_dict()
        key = {f.name: d[f.name] for f in dataclasses.fields(self) if f.metadata["resume"]}
        return {**key, "num_classes": int(num_classes)}
