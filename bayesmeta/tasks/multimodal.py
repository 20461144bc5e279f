"""Multi-family 2-D regression: the heterogeneous benchmark of ARML (Yao et al. 2020; METHODS 9).

Each task draws one of six function families uniformly, then the family's parameters; inputs are
x = (x1, x2) ~ U(x_range)^2 and y = f(x) + N(0, noise_sd^2):

    sine               A sin(w x1 + b)              A ~ U(0.1, 5), w ~ U(0.8, 1.2), b ~ U(0, 2 pi)
    line               a x1 + b                     a, b ~ U(-3, 3)
    quadratic          a x1^2 + b x1 + c            a ~ U(-0.2, 0.2), b ~ U(-2, 2), c ~ U(-3, 3)
    cubic              a x1^3 + b x1^2 + c x1 + d   a ~ U(-0.1, 0.1), b ~ U(-0.2, 0.2), c ~ U(-2, 2),
                                                    d ~ U(-3, 3)
    quadratic_surface  a x1^2 + b x2^2              a, b ~ U(-1, 1)
    ripple             sin(-a (x1^2 + x2^2)) + b    a ~ U(-0.2, 0.2), b ~ U(-3, 3)

The four 1-D families read x1 only and live on the line x2 = 1: their second input is set to the
constant `one_d_x2` (1), as the reference code does, so every task has x_dim = 2 and a network can
tell a 1-D task from a 2-D one by its inputs. 10-shot with 10 query points, noise sd 0.3.

Source: the public ARML code (github.com/huaxiuyao/ARML, data_generator.py `generate_2D_batch` and
2D_bash/2D_10shot.sh: 6 groups, 10 support and 10 query points, x ~ U[-5, 5]^2, noise N(0, 0.3^2),
the ranges above); the survey (seed 002 near its line 1195) has only the table. HSML (Yao et al. 2019)
used the four 1-D families; ARML added the two 2-D ones. Where we differ:
  - tasks are drawn on device with JAX's PRNG (the reference draws with NumPy, a family per task
    uniformly, and every family's parameters for every task; so do we, in one uniform draw);
  - the paper's own text (ARML appendix) could not be retrieved here, so the code is the reference;
    its evaluation (1,000 test tasks of meta-batch 1, 20 test-time steps) is the experiment's
    business (experiments/multimodal_regression), not the family's.

`info["family"]` holds each task's family index into FAMILIES (whatever subset `families` keeps),
declared through the `Groups` capability, so evaluation reports metrics per family. `grid` lays the
1-D families on x1 (x2 = one_d_x2) and the 2-D families on the diagonal x1 = x2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from bayesmeta.config import opt
from bayesmeta.tasks.base import TaskBatch, range_problem, uniform

FAMILIES = ("sine", "line", "quadratic", "cubic", "quadratic_surface", "ripple")
"""The function families in the reference code's order (its `sel` 0..5)."""
SURFACES = ("quadratic_surface", "ripple")
"""The families of both inputs; the others read x1 only."""
PARAMETERS = {
    "sine": ("sine_amplitude", "sine_frequency", "sine_phase"),
    "line": ("line_slope", "line_intercept"),
    "quadratic": ("quadratic_a", "quadratic_b", "quadratic_c"),
    "cubic": ("cubic_a", "cubic_b", "cubic_c", "cubic_d"),
    "quadratic_surface": ("surface_a", "surface_b"),
    "ripple": ("ripple_a", "ripple_b"),
}
"""Each family's parameters: Params fields ([low, high] ranges) and keys of `info`."""


def family_values(p: dict[str, jax.Array], x1: jax.Array, x2: jax.Array) -> jax.Array:
    """The six families' functions at (x1, x2), stacked on a leading axis in FAMILIES order (ARML's
    data_generator.py `generate_2D_batch`); p holds each parameter broadcastable against x1."""
    return jnp.stack(
        [
            p["sine_amplitude"] * jnp.sin(p["sine_frequency"] * x1 + p["sine_phase"]),
            p["line_slope"] * x1 + p["line_intercept"],
            p["quadratic_a"] * x1**2 + p["quadratic_b"] * x1 + p["quadratic_c"],
            p["cubic_a"] * x1**3 + p["cubic_b"] * x1**2 + p["cubic_c"] * x1 + p["cubic_d"],
            p["surface_a"] * x1**2 + p["surface_b"] * x2**2,
            jnp.sin(-p["ripple_a"] * (x1**2 + x2**2)) + p["ripple_b"],
        ]
    )


@dataclass(frozen=True)
class MultiFamily2D:
    """ARML's 2-D regression benchmark: a uniform mixture of six function families (module docstring)."""

    @dataclass(frozen=True)
    class Params:
        families: tuple[str, ...] = opt(
            FAMILIES, doc=f"the families in the mixture, drawn uniformly (any of {', '.join(FAMILIES)})"
        )
        sine_amplitude: tuple[float, ...] = opt((0.1, 5.0))
        sine_frequency: tuple[float, ...] = opt((0.8, 1.2))
        sine_phase: tuple[float, ...] = opt((0.0, 2 * math.pi))
        line_slope: tuple[float, ...] = opt((-3.0, 3.0))
        line_intercept: tuple[float, ...] = opt((-3.0, 3.0))
        quadratic_a: tuple[float, ...] = opt((-0.2, 0.2))
        quadratic_b: tuple[float, ...] = opt((-2.0, 2.0))
        quadratic_c: tuple[float, ...] = opt((-3.0, 3.0))
        cubic_a: tuple[float, ...] = opt((-0.1, 0.1))
        cubic_b: tuple[float, ...] = opt((-0.2, 0.2))
        cubic_c: tuple[float, ...] = opt((-2.0, 2.0))
        cubic_d: tuple[float, ...] = opt((-3.0, 3.0))
        surface_a: tuple[float, ...] = opt((-1.0, 1.0))
        surface_b: tuple[float, ...] = opt((-1.0, 1.0))
        ripple_a: tuple[float, ...] = opt((-0.2, 0.2))
        ripple_b: tuple[float, ...] = opt((-3.0, 3.0))
        x_range: tuple[float, ...] = opt((-5.0, 5.0), doc="both inputs ~ U(x_range)")
        one_d_x2: float = opt(1.0, doc="the second input of the 1-D families (the reference code's 1)")
        noise_sd: float = opt(0.3, ge=0)

    params: Params
    shots: int
    queries: int
    x_dim: int = 2
    y_dim: int = 1
    group_names: ClassVar[tuple[str, ...]] = FAMILIES

    def check(self) -> str | None:
        p = self.params
        unknown = [f for f in p.families if f not in FAMILIES]
        if not p.families or unknown or len(set(p.families)) != len(p.families):
            return (
                f"params.families: expected distinct names among {', '.join(FAMILIES)}, "
                f"got {list(p.families)}"
            )
        names = [k for f in FAMILIES for k in PARAMETERS[f]]
        return range_problem(p, *names, "x_range")

    def group(self, info: dict[str, jax.Array]) -> jax.Array:
        """Each task's family index into FAMILIES (T,)."""
        return info["family"]

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        """f(x) of each task's family at x (T, n, 2) -> (T, n, 1)."""
        p = {k: v[:, None] for k, v in info.items() if k != "family"}
        values = family_values(p, x[..., 0], x[..., 1])  # (6, T, n)
        return jnp.take_along_axis(values, info["family"][None, :, None], 0)[0][..., None]

    def grid(self, info: dict[str, jax.Array], n: int) -> jax.Array:
        """n points per task on x1 over x_range: at x2 = one_d_x2 for the 1-D families, on the diagonal
        x2 = x1 for the surfaces (T, n, 2)."""
        t = jnp.linspace(*self.params.x_range, n)[None, :]
        fam = info["family"][:, None]
        x2 = jnp.where(self._is_surface(fam), t, self.params.one_d_x2)
        return jnp.stack(jnp.broadcast_arrays(t, x2), -1)

    def _is_surface(self, family: jax.Array) -> jax.Array:
        return jnp.isin(family, jnp.asarray([FAMILIES.index(f) for f in SURFACES]))

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p = self.params
        names = [k for f in FAMILIES for k in PARAMETERS[f]]
        kp, kx, ke = jax.random.split(key, 3)
        # one uniform draw for the family and every parameter (each random op costs compile time)
        u = jax.random.uniform(kp, (n_tasks, 1 + len(names)))
        allowed = jnp.asarray([FAMILIES.index(f) for f in p.families])
        pick = jnp.minimum(jnp.floor(u[:, 0] * len(allowed)).astype(jnp.int32), len(allowed) - 1)
        low, high = (jnp.asarray([getattr(p, k)[i] for k in names]) for i in (0, 1))
        info = {"family": allowed[pick]}
        info |= dict(zip(names, (low + u[:, 1:] * (high - low)).T, strict=True))
        n = self.shots + self.queries
        x = uniform(kx, (n_tasks, n, 2), p.x_range)
        one_d = ~self._is_surface(info["family"])[:, None]
        x = x.at[..., 1].set(jnp.where(one_d, p.one_d_x2, x[..., 1]))
        y = self.truth(info, x) + p.noise_sd * jax.random.normal(ke, (n_tasks, n, 1))
        return TaskBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :], info)
