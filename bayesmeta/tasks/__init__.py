"""Task families: jittable samplers of task batches with a leading task axis.

`FAMILIES` holds the built-in ones; bayesmeta.registry adds registered names, installed plugins and
import paths, and builds a family from its config (`registry.make_family`).
"""

from __future__ import annotations

from bayesmeta.tasks.ambiguous import SineLine
from bayesmeta.tasks.arrays import Arrays
from bayesmeta.tasks.base import (
    Classification,
    Counterfactual,
    DenseGrid,
    Environment,
    ExactPredictive,
    Family,
    GroundTruth,
    Groups,
    Hypotheses,
    PriorDraws,
    TaskBatch,
    TaskMetrics,
)
from bayesmeta.tasks.basis import BasisRegression
from bayesmeta.tasks.dynamics import PendulumDynamics
from bayesmeta.tasks.multimodal import MultiFamily2D
from bayesmeta.tasks.omniglot import Omniglot, OmniglotRuns
from bayesmeta.tasks.pose import OmniglotPose
from bayesmeta.tasks.sinusoid import NMESinusoid, Sinusoid
from bayesmeta.tasks.tfds_images import TFDSImages

FAMILIES: dict[str, type] = {
    "sinusoid": Sinusoid,
    "nme_sinusoid": NMESinusoid,
    "sine_line": SineLine,
    "basis_regression": BasisRegression,
    "multimodal": MultiFamily2D,
    "omniglot": Omniglot,
    "omniglot_runs": OmniglotRuns,
    "omniglot_pose": OmniglotPose,
    "arrays": Arrays,
    "tfds_images": TFDSImages,
    "pendulum_dynamics": PendulumDynamics,
}

__all__ = [
    "FAMILIES",
    "Classification",
    "Counterfactual",
    "DenseGrid",
    "Environment",
    "ExactPredictive",
    "Family",
    "GroundTruth",
    "Groups",
    "Hypotheses",
    "PriorDraws",
    "TaskBatch",
    "TaskMetrics",
]
