"""Resolves a method name from the config to the builder in `models/` (the engine names none)."""

from __future__ import annotations

from typing import NamedTuple

from bayesmeta.config import ConfigError, ModelConfig, parse_params
from bayesmeta.method import Method


def _methods() -> dict:
    import models

    return models.METHODS


def available_methods() -> list[str]:
    return sorted(_methods())


def check_method_params(cfg: ModelConfig) -> object:
    """Validate [model.params] against the method's own Params dataclass."""
    spec = _methods()[cfg.method]
    params = parse_params(spec.Params, cfg.params, "model")
    problem = spec.check(cfg, params) if hasattr(spec, "check") else None
    if problem:
        raise ConfigError(problem)
    return params


class Context(NamedTuple):
    """What a method may know of the training protocol: meta-training tasks n and query points K
    (the PAC-Bayes bound's n and K, from which MR(W) can derive its beta), and the number of classes
    of a classification family's meta-training split (for pre-training baselines)."""

    n_tasks: int = 1
    n_query: int = 1
    n_classes: int | None = None


def build_method(cfg: ModelConfig, x_dim: int, y_dim: int, context: Context | None = None) -> Method:
    """Construct the method named by cfg.method for inputs of x_dim and outputs of y_dim."""
    spec = _methods()[cfg.method]
    return spec.build(cfg, check_method_params(cfg), x_dim, y_dim, context or Context())
