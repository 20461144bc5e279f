"""A synthetic N-way family for the metric learners' tests (test-only; named by import path
"tests.clusters:Clusters"), and a short fit that measures held-out accuracy before and after training.

Each task draws N class centres c_k ~ N(0, separation^2 I) in the first `informative` input dimensions;
an example of class k is [c_k + N(0, noise^2 I), N(0, nuisance^2 I)]: the other dimensions are loud noise.
Distances on the raw inputs (or a random embedding) are dominated by the noise, so a learner beats
chance clearly only once its embedding has learned to read the informative dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bayesmeta import registry
from bayesmeta.config import opt
from bayesmeta.fit import make_chunk, make_svi
from bayesmeta.predict import predictive
from bayesmeta.run import Setup
from bayesmeta.tasks import TaskBatch
from bayesmeta.tasks.episodes import episode


@dataclass(frozen=True)
class Clusters:
    """N-way episodes of Gaussian clusters hidden among noisy dimensions (module docstring)."""

    @dataclass(frozen=True)
    class Params:
        ways: int = opt(5, ge=2, doc="classes per task (N)")
        dim: int = opt(12, ge=2, doc="input dimensions")
        informative: int = opt(2, ge=1, doc="dimensions holding the class centres")
        separation: float = opt(1.5, gt=0, doc="sd of the class centres")
        noise: float = opt(0.3, ge=0, doc="sd of an example around its centre")
        nuisance: float = opt(3.0, ge=0, doc="sd of the other dimensions")

    params: Params
    shots: int
    queries: int
    n_classes: int = 1  # no global classes: every task draws its own

    @property
    def x_dim(self) -> int:
        return self.params.dim

    @property
    def y_dim(self) -> int:
        return self.params.ways

    @property
    def query_points(self) -> int:
        return self.params.ways * self.queries

    def check(self) -> str | None:
        return None if self.params.informative < self.params.dim else "params.informative: must be < dim"

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p, per = self.params, self.shots + self.queries
        kc, ki, kn = jax.random.split(key, 3)
        centres = p.separation * jax.random.normal(kc, (n_tasks, p.ways, 1, p.informative))
        signal = centres + p.noise * jax.random.normal(ki, (n_tasks, p.ways, per, p.informative))
        noise = p.nuisance * jax.random.normal(kn, (n_tasks, p.ways, per, p.dim - p.informative))
        classes = jnp.broadcast_to(jnp.arange(p.ways), (n_tasks, p.ways))
        return episode(jnp.concatenate([signal, noise], -1), self.shots, classes)


BASE = [
    "task.family='tests.clusters:Clusters'",
    "model.likelihood='categorical'",
    "task.shots=1",
    "task.queries=3",
    "model.net.hidden=[16]",
    "train.lr=3e-3",
    "train.meta_batch=8",
]


def fit_accuracy(*overrides: str, steps: int = 300, eval_tasks: int = 200) -> tuple[float, float, Setup]:
    """Held-out query accuracy of the method before and after `steps` SVI steps on BASE + overrides
    through the engine's training chunk (tasks sampled on device) and predictive."""
    cfg = registry.load_config(None, [*BASE, *overrides])
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    tasks = setup.family.sample(jax.random.PRNGKey(99), eval_tasks)
    # the initial parameters depend on the batch's shapes only: a slice of the held-out tasks (no
    # second sampler program to compile)
    state = jax.jit(svi.init)(jax.random.PRNGKey(0), jax.tree.map(lambda a: a[:8], tasks))
    run = predictive(setup.method, 0, 1, ("f",))

    def accuracy(state) -> float:
        f = run(svi.get_params(state), tasks, jax.random.PRNGKey(0))["f"][0]
        return float(jnp.mean(jnp.argmax(f, -1) == tasks.y_query))

    before = accuracy(state)
    chunk = make_chunk(svi, setup.family, cfg.train.meta_batch)
    state, _, finite = chunk(state, jnp.asarray(0), steps, jax.random.PRNGKey(2))
    assert bool(finite)
    return before, accuracy(state), setup
