"""Task families: jittable samplers of task batches with a leading task axis."""

from __future__ import annotations

from bayesmeta.config import ConfigError, TaskConfig, parse_params
from bayesmeta.tasks.ambiguous import SineLine
from bayesmeta.tasks.arrays import Arrays
from bayesmeta.tasks.base import Family, TaskBatch
from bayesmeta.tasks.basis import BasisRegression
from bayesmeta.tasks.omniglot import Omniglot, OmniglotRuns
from bayesmeta.tasks.sinusoid import NMESinusoid, Sinusoid
from bayesmeta.tasks.tfds_images import TFDSImages

FAMILIES: dict[str, type] = {
    "sinusoid": Sinusoid,
    "nme_sinusoid": NMESinusoid,
    "sine_line": SineLine,
    "basis_regression": BasisRegression,
    "omniglot": Omniglot,
    "omniglot_runs": OmniglotRuns,
    "arrays": Arrays,
    "tfds_images": TFDSImages,
}

__all__ = ["FAMILIES", "Family", "TaskBatch", "make_family"]


def make_family(cfg: TaskConfig, prefix: str = "task") -> Family:
    """Build the family named in a TaskConfig; its `params` table is validated by the family."""
    cls = FAMILIES[cfg.family]
    params = parse_params(cls.Params, cfg.params, prefix)
    family = cls(params=params, shots=cfg.shots, queries=cfg.queries)
    problem = family.check()
    if problem:
        raise ConfigError(f"{prefix}.{problem}")
    return family
