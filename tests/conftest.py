"""Shared helpers: small configs that compile and train in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

from bayesmeta import config, registry

SMALL = [
    "train.steps=200",
    "train.meta_batch=8",
    "train.log_every=50",
    "train.eval_every=100",
    "train.eval_tasks=20",
    "train.checkpoint_every=100",
    "eval.tasks=40",
    "eval.batch=20",
    "eval.plot_tasks=4",
    "model.net.hidden=[16, 16]",
]


@pytest.fixture
def small_cfg():
    """registry.load_config(None, SMALL + overrides): the built-in default shrunk to a few seconds."""

    def make(*overrides: str) -> config.Config:
        return registry.load_config(None, [*SMALL, *overrides])

    return make
