"""Sinusoid regression families: MAML's (Finn et al. 2017) and the NME one (Yin et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from bayesmeta.config import opt
from bayesmeta.tasks.base import Regression1D, TaskBatch, range_problem, regression_batch, uniform


@dataclass(frozen=True)
class Sinusoid(Regression1D):
    """y = A sin(x - phase) + eps, A ~ U(amplitude), phase ~ U(phase), x ~ U(x_range) (METHODS 2)."""

    @dataclass(frozen=True)
    class Params:
        amplitude: tuple[float, ...] = opt((0.1, 5.0))
        phase: tuple[float, ...] = opt((0.0, 3.141592653589793))
        x_range: tuple[float, ...] = opt((-5.0, 5.0))
        noise_sd: float = opt(0.0, ge=0)

    ranges: ClassVar[tuple[str, ...]] = ("amplitude", "phase", "x_range")

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        """Noise-free task function at inputs x (T, n, 1)."""
        return info["amplitude"][:, None, None] * jnp.sin(x - info["phase"][:, None, None])

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p = self.params
        ka, kp, kx, ke = jax.random.split(key, 4)
        info = {
            "amplitude": uniform(ka, (n_tasks,), p.amplitude),
            "phase": uniform(kp, (n_tasks,), p.phase),
        }
        return regression_batch(kx, ke, self.truth, info, self.shots, self.queries, p.x_range, p.noise_sd)


@dataclass(frozen=True)
class NMESinusoid:
    """Non-mutually-exclusive sinusoid (Yin et al. 2020, METHODS 4): x = (u, one-hot amplitude index).

    split="train": index ~ U{0..n_train-1}, A = amplitudes[index], u ~ U(x_range) for support and query.
    split="test": A ~ U(amplitude range), the one-hot names a random training index other than A's
    nearest one (so it misleads, on an input unit that was trained),
    u ~ U(x_range) for the support set, queries on an even grid over test_grid; both noisy.
    The training one-hot identifies the amplitude, so one function solves every training task and a
    meta-learner can ignore the support set (memorize); at test the one-hot is misleading.
    """

    @dataclass(frozen=True)
    class Params:
        split: str = opt("train", choices=["train", "test"])
        n_amplitudes: int = opt(20, ge=2)
        n_train: int = opt(16, ge=2, doc="training tasks use amplitude indices 0..n_train-1")
        amplitude: tuple[float, ...] = opt((0.1, 4.0))
        x_range: tuple[float, ...] = opt((-5.0, 5.0))
        test_grid: tuple[float, ...] = opt((-4.5, 4.5))
        noise_sd: float = opt(0.1, ge=0)

    params: Params
    shots: int
    queries: int
    y_dim: int = 1

    @property
    def x_dim(self) -> int:
        return 1 + self.params.n_amplitudes

    def check(self) -> str | None:
        p = self.params
        if p.n_train > p.n_amplitudes:
            return f"params.n_train: expected <= n_amplitudes ({p.n_amplitudes}), got {p.n_train}"
        return range_problem(p, "amplitude", "x_range", "test_grid")

    @property
    def amplitudes(self) -> jax.Array:
        return jnp.linspace(*self.params.amplitude, self.params.n_amplitudes)

    def _inputs(self, u: jax.Array, index: jax.Array) -> jax.Array:
        onehot = jax.nn.one_hot(index, self.params.n_amplitudes)[:, None, :]
        return jnp.concatenate([u, jnp.broadcast_to(onehot, (*u.shape[:2], onehot.shape[-1]))], -1)

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        return info["amplitude"][:, None, None] * jnp.sin(x[..., :1])

    def grid(self, info: dict[str, jax.Array], n: int) -> jax.Array:
        u = jnp.linspace(*self.params.test_grid, n)[None, :, None]
        u = jnp.broadcast_to(u, (info["amplitude"].shape[0], n, 1))
        return self._inputs(u, info["index"])

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p = self.params
        ki, ka, ku, ke, kq = jax.random.split(key, 5)
        if p.split == "train":
            index = jax.random.randint(ki, (n_tasks,), 0, p.n_train)
            amplitude = self.amplitudes[index]
            u = uniform(ku, (n_tasks, self.shots + self.queries, 1), p.x_range)
            u_s, u_q = u[:, : self.shots], u[:, self.shots :]
        else:
            amplitude = uniform(ka, (n_tasks,), p.amplitude)
            # a training index other than the one nearest to A (the reference draws from 0..15 too)
            nearest = jnp.argmin(jnp.abs(amplitude[:, None] - self.amplitudes[None]), axis=1)
            shift = jax.random.randint(ki, (n_tasks,), 1, p.n_train)
            anywhere = jax.random.randint(ki, (n_tasks,), 0, p.n_train)
            index = jnp.where(nearest < p.n_train, (nearest + shift) % p.n_train, anywhere)
            u_s = uniform(ku, (n_tasks, self.shots, 1), p.x_range)
            u_q = jnp.broadcast_to(
                jnp.linspace(*p.test_grid, self.queries)[None, :, None], (n_tasks, self.queries, 1)
            )
        info = {"amplitude": amplitude, "index": index}
        x_s, x_q = self._inputs(u_s, index), self._inputs(u_q, index)
        noise_s = p.noise_sd * jax.random.normal(ke, u_s.shape)
        noise_q = p.noise_sd * jax.random.normal(kq, u_q.shape)
        return TaskBatch(x_s, self.truth(info, x_s) + noise_s, x_q, self.truth(info, x_q) + noise_q, info)
