"""A pendulum with varying dynamics, in pure JAX, and the task family of its transition windows (GrBAL).

The environment is written here rather than taken from gymnax or brax: gymnax's Pendulum-v1 has no
friction or actuator gain and fixes its parameters per environment, brax's physics is far more than a
one-joint system needs, and either would add a dependency for ~20 lines of arithmetic. Everything is
pure functions of pytrees, so steps jit and vmap over tasks and the dynamics may change at any step.

    theta_ddot = 3 g / (2 l) sin(theta) + 3 (k u - b omega) / (m l^2)   a uniform rod; theta = 0 upright
    omega' = clip(omega + dt theta_ddot, -max_speed, max_speed)      semi-implicit Euler, as gym's
    theta' = theta + dt omega'
    cost(s, u) = wrap(theta)^2 + 0.1 omega^2 + 0.001 u^2               (gym's Pendulum-v1 reward, negated)

with mass m, length l, friction b and actuator gain k per task (a crippled actuator has k < 1), and
u clipped to [-max_torque, max_torque].

The family (Nagabandi et al. 2019, METHODS 9): a task is a window of M + K consecutive transitions of
one dynamics setting under uniformly random actions, from a random state; the support set is the first
M = task.shots, the query set the next K = task.queries. Inputs and targets are scaled to O(1):

    x = (cos theta, sin theta, omega / max_speed, u / max_torque)
    y = ((theta' - theta) / (dt max_speed), (omega' - omega) / (dt g))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bayesmeta.config import opt
from bayesmeta.tasks.base import TaskBatch, range_problem, uniform


class Dynamics(NamedTuple):
    """One pendulum's physical parameters (scalars, or arrays with a leading task/time axis)."""

    mass: jax.Array
    length: jax.Array
    friction: jax.Array
    gain: jax.Array


@dataclass(frozen=True)
class Pendulum:
    """The pendulum's fixed constants; state s = (theta, omega), action u a scalar torque command."""

    dt: float = 0.05
    gravity: float = 10.0
    max_speed: float = 8.0
    max_torque: float = 2.0

    def step(self, d: Dynamics, s: jax.Array, u: jax.Array) -> jax.Array:
        """s' from s (2,) and u () under dynamics d (module docstring's semi-implicit Euler)."""
        theta, omega = s[0], s[1]
        u = jnp.clip(u, -self.max_torque, self.max_torque)
        acc = 1.5 * self.gravity / d.length * jnp.sin(theta) + 3.0 * (d.gain * u - d.friction * omega) / (
            d.mass * d.length**2
        )
        omega = jnp.clip(omega + self.dt * acc, -self.max_speed, self.max_speed)
        return jnp.stack([theta + self.dt * omega, omega])

    @staticmethod
    def cost(s: jax.Array, u: jax.Array) -> jax.Array:
        """wrap(theta)^2 + 0.1 omega^2 + 0.001 u^2 (gym Pendulum-v1) for states (..., 2), actions (...)."""
        theta = jnp.mod(s[..., 0] + jnp.pi, 2 * jnp.pi) - jnp.pi
        return theta**2 + 0.1 * s[..., 1] ** 2 + 0.001 * u**2

    def features(self, s: jax.Array, u: jax.Array) -> jax.Array:
        """x = (cos theta, sin theta, omega / max_speed, u / max_torque) for s (..., 2) and u (...)."""
        u = jnp.clip(u, -self.max_torque, self.max_torque)
        return jnp.stack(
            [jnp.cos(s[..., 0]), jnp.sin(s[..., 0]), s[..., 1] / self.max_speed, u / self.max_torque], -1
        )

    @property
    def y_scale(self) -> jax.Array:
        """y = (s' - s) / y_scale: (dt max_speed, dt g)."""
        return jnp.array([self.dt * self.max_speed, self.dt * self.gravity])

    def targets(self, s: jax.Array, s_next: jax.Array) -> jax.Array:
        """y = (s' - s) / y_scale."""
        return (s_next - s) / self.y_scale

    def apply_change(self, s: jax.Array, y: jax.Array) -> jax.Array:
        """The next state s + y * y_scale that a predicted (scaled) change y gives."""
        return s + y * self.y_scale

    def rollout(self, d: Dynamics, s0: jax.Array, actions: jax.Array) -> jax.Array:
        """States (n + 1, 2) from s0 under actions (n,); d may carry a leading time axis (n,) (dynamics
        that change within the episode) or be scalars."""
        per_step = jnp.ndim(d.mass) > 0
        ds = d if per_step else jax.tree.map(lambda a: jnp.broadcast_to(a, actions.shape), d)

        def body(s: jax.Array, du: tuple) -> tuple:
            s_next = self.step(du[0], s, du[1])
            return s_next, s_next

        _, states = jax.lax.scan(body, s0, (ds, actions))
        return jnp.concatenate([s0[None], states])


@dataclass(frozen=True)
class PendulumDynamics:
    """Windows of M + K transitions of a pendulum whose mass, length, friction and actuator gain vary
    between tasks (module docstring); support = the first M (task.shots), query = the next K."""

    @dataclass(frozen=True)
    class Params:
        mass: tuple[float, ...] = opt((0.5, 2.0), doc="[low, high] of the uniform mass m per task")
        length: tuple[float, ...] = opt((0.75, 1.25), doc="[low, high] of the pendulum length l")
        friction: tuple[float, ...] = opt((0.0, 0.3), doc="[low, high] of the joint friction b")
        gain: tuple[float, ...] = opt(
            (0.3, 1.2), doc="[low, high] of the actuator gain k (torque = k u; k < 1 a crippled motor)"
        )
        init_speed: float = opt(6.0, ge=0, doc="the window's first omega ~ U(-init_speed, init_speed)")
        dt: float = opt(0.05, gt=0, doc="time step (s)")
        gravity: float = opt(10.0, gt=0)
        max_speed: float = opt(8.0, gt=0, doc="|omega| is clipped to this")
        max_torque: float = opt(2.0, gt=0, doc="|u| is clipped to this; random actions ~ U(-max, max)")

    params: Params
    shots: int
    queries: int
    x_dim: int = 4
    y_dim: int = 2

    @property
    def env(self) -> Pendulum:
        p = self.params
        return Pendulum(p.dt, p.gravity, p.max_speed, p.max_torque)

    def check(self) -> str | None:
        return range_problem(self.params, "mass", "length", "friction", "gain")

    def dynamics(self, key: jax.Array, n_tasks: int) -> Dynamics:
        """Each task's dynamics, uniform over the ranges: (T,) per field."""
        p = self.params
        k = jax.random.split(key, 4)
        return Dynamics(
            uniform(k[0], (n_tasks,), p.mass),
            uniform(k[1], (n_tasks,), p.length),
            uniform(k[2], (n_tasks,), p.friction),
            uniform(k[3], (n_tasks,), p.gain),
        )

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p, env = self.params, self.env
        kd, kt, kw, ku = jax.random.split(key, 4)
        d = self.dynamics(kd, n_tasks)
        n = self.shots + self.queries
        s0 = jnp.stack(
            [
                uniform(kt, (n_tasks,), (-jnp.pi, jnp.pi)),
                uniform(kw, (n_tasks,), (-p.init_speed, p.init_speed)),
            ],
            -1,
        )
        u = uniform(ku, (n_tasks, n), (-p.max_torque, p.max_torque))
        states = jax.vmap(env.rollout)(d, s0, u)  # (T, n + 1, 2)
        x = env.features(states[:, :-1], u)
        y = env.targets(states[:, :-1], states[:, 1:])
        m = self.shots
        return TaskBatch(x[:, :m], y[:, :m], x[:, m:], y[:, m:], d._asdict())
