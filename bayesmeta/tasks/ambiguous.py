"""Ambiguous regression (Finn, Xu & Levine 2018, METHODS 3): half the tasks are sinusoids, half lines.

With few support points (5, or 1-2 for the mode-rich setting) a support set is often explained by both
hypotheses, so a good posterior predictive puts samples on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.config import opt
from bayesmeta.diagnostics.calibration import sine_like
from bayesmeta.tasks.base import Regression1D, TaskBatch, regression_batch, uniform


@dataclass(frozen=True)
class SineLine(Regression1D):
    """kind ~ Bernoulli(p_sine); sine: A sin(x - phase); line: slope x + intercept; y = f(x) + N(0, sd^2)."""

    @dataclass(frozen=True)
    class Params:
        p_sine: float = opt(0.5, ge=0, le=1)
        amplitude: tuple[float, ...] = opt((0.1, 5.0))
        phase: tuple[float, ...] = opt((0.0, 3.141592653589793))
        slope: tuple[float, ...] = opt((-3.0, 3.0))
        intercept: tuple[float, ...] = opt((-3.0, 3.0))
        x_range: tuple[float, ...] = opt((-5.0, 5.0))
        noise_sd: float = opt(0.3, ge=0)

    ranges: ClassVar[tuple[str, ...]] = ("amplitude", "phase", "slope", "intercept", "x_range")
    n_hypotheses: ClassVar[int] = 2  # hypothesis 1: a sinusoid, 0: a line

    def hypothesis(self, f: jax.Array, x: jax.Array) -> jax.Array:
        """1 where a sinusoid a sin x + b cos x + c fits f (..., G) on the grid x (G,) better than a line."""
        return sine_like(f, x).astype(jnp.int32)

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        col = lambda k: info[k][:, None, None]  # noqa: E731
        sine = col("amplitude") * jnp.sin(x - col("phase"))
        line = col("slope") * x + col("intercept")
        return jnp.where(col("sine") > 0, sine, line)

    def latents(self, keys: tuple[jax.Array, ...], n: int) -> dict[str, jax.Array]:
        """n draws of the task latents from the prior (the kind and both kinds' parameters), one key each."""
        p = self.params
        kk, ka, kp, ks, ki = keys
        return {
            "sine": jax.random.bernoulli(kk, p.p_sine, (n,)).astype(jnp.int32),
            "amplitude": uniform(ka, (n,), p.amplitude),
            "phase": uniform(kp, (n,), p.phase),
            "slope": uniform(ks, (n,), p.slope),
            "intercept": uniform(ki, (n,), p.intercept),
        }

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p = self.params
        *kl, kx, ke = jax.random.split(key, 7)
        info = self.latents(tuple(kl), n_tasks)
        return regression_batch(kx, ke, self.truth, info, self.shots, self.queries, p.x_range, p.noise_sd)

    def prior_functions(self, key: jax.Array, n: int, x: jax.Array) -> jax.Array:
        """n functions of the task prior at the inputs x (m, 1): (n, m, 1)."""
        return self.truth(
            self.latents(tuple(jax.random.split(key, 5)), n), jnp.broadcast_to(x, (n, *x.shape))
        )

    def observation_sd(self) -> float:
        """The sd of the Gaussian observation noise."""
        return self.params.noise_sd

    def ambiguous(self, batch: TaskBatch) -> np.ndarray:
        """Support sets that both hypotheses explain: least-squares line and sinusoid fits to the support
        points both leave an RMS residual within 2 noise sds (every set of at most 2 points qualifies)."""
        x, y = np.asarray(batch.x_support[..., 0]), np.asarray(batch.y_support[..., 0])
        ones = np.ones_like(x)

        def rms(basis: np.ndarray) -> np.ndarray:
            fitted = np.stack(
                [b @ np.linalg.lstsq(b, yi, rcond=None)[0] for b, yi in zip(basis, y, strict=True)]
            )
            return np.sqrt(np.mean((fitted - y) ** 2, -1))

        line = np.stack([x, ones], -1)
        sine = np.stack([np.sin(x), np.cos(x), ones], -1)
        tol = 2 * self.params.noise_sd
        return (rms(line) <= tol) & (rms(sine) <= tol)
