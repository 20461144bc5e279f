"""The task batch and the protocol every task family follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax


class TaskBatch(NamedTuple):
    """Support and query sets of T tasks: x (T, n, x_dim), y (T, n, y_dim); `info` holds task latents."""

    x_support: jax.Array
    y_support: jax.Array
    x_query: jax.Array
    y_query: jax.Array | None
    info: dict[str, jax.Array]

    @property
    def n_tasks(self) -> int:
        return self.x_support.shape[0]

    def take(self, idx: Any) -> TaskBatch:
        """Select tasks along the leading axis."""
        return jax.tree.map(lambda a: a[idx], self)


@runtime_checkable
class Family(Protocol):
    """What the engine needs from every task family.

    A family is a class with a nested frozen dataclass `Params` (its [task.params] options, fields
    declared with bayesmeta.config.opt; an empty dataclass if it has none), built by the registry as
    `cls(params=cls.Params(...), shots=cfg.shots, queries=cfg.queries)`. Then:

    x_dim, y_dim: the input size, and the output size (regression) or number of classes per task.
    check() -> a config problem relative to [task] (e.g. "params.x_range: ...", "shots: ...") or None.
    sample(key, n_tasks) -> TaskBatch: jittable, deterministic in key, static shapes.

    What a family can do beyond this it declares by the capability protocols below (GroundTruth,
    Counterfactual, TaskMetrics, DenseGrid, ExactPredictive, PriorDraws, Hypotheses, Classification,
    Groups); the engine's diagnostics use them.
    """

    Params: ClassVar[type]
    params: Any
    shots: int
    queries: int
    x_dim: int
    y_dim: int

    def check(self) -> str | None: ...

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch: ...


@runtime_checkable
class GroundTruth(Protocol):
    """The noise-free task function is known (memorization meter, prediction plots)."""

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        """f(x) for each task's latents `info`, at inputs x (T, n, x_dim) -> (T, n, y_dim)."""
        ...


@runtime_checkable
class Counterfactual(Protocol):
    """Each task can be turned into another task of the family with the same query inputs (the support
    set and latents changed), whose noise-free targets at those inputs are known: the memorization
    meter's swap for families whose inputs are not shared between tasks (images of one character)."""

    def counterfactual(self, key: jax.Array, tasks: TaskBatch) -> tuple[TaskBatch, jax.Array]:
        """(tasks with each support set and `info` replaced by another task's and y_query None, that
        task's noise-free targets at tasks.x_query (T, n, y_dim)); the swap is drawn from key."""
        ...


@runtime_checkable
class TaskMetrics(Protocol):
    """The family scores predictions in its own units beside the likelihood's metrics (e.g. an angle
    error from predicted (cos, sin)): evaluation adds them to every test-time step count."""

    def task_metrics(self, mean: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """Per-task metrics (name -> (T,)) of the predictive mean (T, n, y_dim) against y (T, n, y_dim)."""
        ...


@runtime_checkable
class DenseGrid(Protocol):
    """Inputs can be laid on a dense grid over their range (1-D prediction plots, `sample`)."""

    def grid(self, info: dict[str, jax.Array], n: int) -> jax.Array:
        """n evenly spaced inputs per task: (T, n, x_dim)."""
        ...


@runtime_checkable
class ExactPredictive(Protocol):
    """The posterior predictive given a support set is known in closed form (the gold standard)."""

    def exact_predictive(self, batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
        """Mean and sd of p(y* | x*, support) at the query inputs, each (T, n, y_dim)."""
        ...


@runtime_checkable
class Hypotheses(Protocol):
    """Tasks come from a few distinct function classes, and a support set can fit more than one
    (ambiguity): mode coverage asks whether sampled functions cover every hypothesis."""

    n_hypotheses: int

    def hypothesis(self, f: jax.Array, x: jax.Array) -> jax.Array:
        """Which hypothesis (0..n_hypotheses-1) each function f (..., G) on a grid x (G,) follows."""
        ...

    def ambiguous(self, batch: TaskBatch) -> Any:
        """(T,) bool: the support sets that more than one hypothesis explains."""
        ...


@runtime_checkable
class PriorDraws(Protocol):
    """y = f(x) + N(0, sd^2) with f drawn from a task prior the family can sample: the exact posterior
    predictive given a support set is within reach of self-normalised importance sampling
    (bayesmeta.diagnostics.reference), for families whose predictive has no closed form."""

    def prior_functions(self, key: jax.Array, n: int, x: jax.Array) -> jax.Array:
        """n noise-free functions drawn from the task prior, at the inputs x (m, x_dim): (n, m, y_dim)."""
        ...

    def observation_sd(self) -> float:
        """The sd of the Gaussian observation noise."""
        ...


@runtime_checkable
class Classification(Protocol):
    """N-way episodes: y holds class ids; `query_points` counts query examples per task (the bound's
    K) and `n_classes` the classes of the split (for pre-training baselines)."""

    query_points: int
    n_classes: int


@runtime_checkable
class Groups(Protocol):
    """Tasks fall into named groups (e.g. the function families of a mixture): evaluation reports every
    metric per group beside the overall one (metrics.json `groups`)."""

    group_names: tuple[str, ...]

    def group(self, info: dict[str, jax.Array]) -> jax.Array:
        """Each task's group index (T,) into group_names, from its latents `info`."""
        ...


@runtime_checkable
class Environment(Protocol):
    """Tasks are Markov decision processes (meta-RL): `environment` simulates every task, each task's
    parameters (e.g. a navigation goal) are the entries of `batch.info`, and a method collects its own
    data by rollouts inside its model. The environment object offers obs_dim, act_dim, horizon,
    reset(task) -> state, observe(state) -> obs and step(task, state, action) -> (state, reward),
    pure and jittable, for one task's `info` entries (no task axis)."""

    environment: Any


def range_problem(params: Any, *names: str) -> str | None:
    """The first of the named [low, high] parameters that is not an interval, as a config error."""
    for name in names:
        bounds = getattr(params, name)
        if len(bounds) != 2 or not bounds[0] <= bounds[1]:
            return f"params.{name}: expected [low, high] with low <= high, got {list(bounds)}"
    return None


def uniform(key: jax.Array, shape: tuple[int, ...], bounds: tuple[float, ...]) -> jax.Array:
    return jax.random.uniform(key, shape, minval=bounds[0], maxval=bounds[1])


def grid_1d(bounds: tuple[float, ...], n_tasks: int, n: int) -> jax.Array:
    """An even grid of n inputs over `bounds`, for every task: (T, n, 1)."""
    import jax.numpy as jnp

    return jnp.broadcast_to(jnp.linspace(*bounds, n)[None, :, None], (n_tasks, n, 1))


def regression_batch(
    kx: jax.Array,
    ke: jax.Array,
    truth: Any,
    info: dict[str, jax.Array],
    shots: int,
    queries: int,
    x_range: tuple[float, ...],
    noise_sd: float,
) -> TaskBatch:
    """x ~ U(x_range) (key kx) for shots + queries points per task, y = truth(info, x) + N(0, noise_sd^2)
    (key ke), split into support and query sets."""
    n_tasks = next(iter(info.values())).shape[0]
    x = uniform(kx, (n_tasks, shots + queries, 1), x_range)
    y = truth(info, x) + noise_sd * jax.random.normal(ke, x.shape)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], info)


@dataclass(frozen=True)
class Regression1D:
    """Shared shape of the 1-D regression families: Params with an x_range, a grid over it, and the
    [low, high] parameters named in `ranges` checked."""

    params: Any
    shots: int
    queries: int
    x_dim: int = 1
    y_dim: int = 1
    ranges: ClassVar[tuple[str, ...]] = ("x_range",)

    def check(self) -> str | None:
        return range_problem(self.params, *self.ranges)

    def grid(self, info: dict[str, jax.Array], n: int) -> jax.Array:
        return grid_1d(self.params.x_range, next(iter(info.values())).shape[0], n)
