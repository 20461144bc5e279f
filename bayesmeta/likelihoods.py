"""Observation models: the NumPyro distribution of y given network outputs, and its mean loss.

[model] noise chooses the Gaussian's sd (make_likelihood):

    fixed            y ~ N(f(x), sd^2), sd = model.noise_sd
    learned          the same with sd a meta-parameter: numpyro.param "noise_sd" > 0, started at
                     model.noise_sd (one per model; Finn, Xu & Levine 2018 learn it for MAML)
    heteroscedastic  the network outputs 2 y_dim values (f, r) and y ~ N(f(x), sd(x)^2) with
                     sd(x) = 0.1 + 0.9 softplus(r(x)) (the NP papers' head: Garnelo et al. 2018, Le et al.
                     2018), recorded per point at the deterministic site "y_sd"

The inner loops keep the MSE of f (`loss`) in every case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayesmeta.config import ModelConfig

NOISE_SITE = "noise_sd"
"""The learned observation sd's numpyro.param site (model.noise = "learned")."""
SD_SITE = "y_sd"
"""The heteroscedastic head's per-point sd, a deterministic site (T, n, y_dim) recorded with "f"."""
MIN_SD = 0.1
SD_SLOPE = 0.9
"""sd(x) = MIN_SD + SD_SLOPE softplus(r(x)): the NP papers' floor keeps the NLL bounded when a point is
fitted exactly (the default sinusoid has no noise; as sd -> 0 its gradients grow as 1/sd^2), and at r = 0
sd = 0.72, near the default sd sqrt(1/2). It cannot go below 0.1 (in the units of y)."""


@dataclass(frozen=True)
class Gaussian:
    """y ~ N(f, sd^2) per output; with sd = sqrt(1/2) the NLL is the MSE + log(sqrt(pi)). When `learned`
    names a parameter site, the model learns sd there and `at(params)` reads it; when `heteroscedastic`,
    the network's output is (f, r) of width 2 y_dim and sd = MIN_SD + SD_SLOPE softplus(r) per point."""

    sd: float | jax.Array
    learned: str | None = None
    heteroscedastic: bool = False

    @property
    def draw_sites(self) -> tuple[str, ...]:
        """Deterministic sites beside "f" that the engine needs from each predictive draw."""
        return (SD_SITE,) if self.heteroscedastic else ()

    def out_dim(self, y_dim: int) -> int:
        """The network's output width for y_dim targets: f, and r for the heteroscedastic sd."""
        return 2 * y_dim if self.heteroscedastic else y_dim

    def in_model(self) -> Gaussian:
        """This observation model inside a NumPyro model: a learned sd is read from its numpyro.param
        site (positive, initialised at the fixed sd); otherwise unchanged."""
        if self.learned is None:
            return self
        sd = numpyro.param(self.learned, jnp.asarray(self.sd), constraint=constraints.positive)
        return replace(self, sd=sd, learned=None)

    def at(self, params: dict, draws: dict | None = None) -> Gaussian:
        """The observation model of y given a draw's f at fitted parameters: N(f, sd^2) with the learned
        sd (params), or with each draw's per-point sd (the site SD_SITE of `draws`, (S, T, n, y_dim))."""
        if self.heteroscedastic:
            if draws is None:
                raise ValueError("a heteroscedastic likelihood's sd is per draw: pass the draws")
            return Gaussian(draws[SD_SITE])
        return Gaussian(params[self.learned]) if self.learned else self

    def scale(self, out: jax.Array) -> jax.Array:
        """The sd of y at each output: the fixed or learned sd, or MIN_SD + SD_SLOPE softplus(r)."""
        if self.heteroscedastic:
            return MIN_SD + SD_SLOPE * jax.nn.softplus(out[..., out.shape[-1] // 2 :])
        return jnp.broadcast_to(self.sd, out.shape)

    def sites(self, out: jax.Array) -> dict[str, jax.Array]:
        """The deterministic sites recorded with each observation: "f", and SD_SITE if heteroscedastic."""
        if self.heteroscedastic:
            return {"f": self.mean(out), SD_SITE: self.scale(out)}
        return {"f": self.mean(out)}

    def dist(self, out: jax.Array) -> dist.Distribution:
        return dist.Normal(self.mean(out), self.scale(out)).to_event(1)

    def fisher_sqrt(self, out: jax.Array) -> jax.Array:
        """w with J^T diag(w^2) J the Gauss-Newton curvature of -log p(y | out) for J = d out / d params:
        1/sd for f; for the heteroscedastic r, sqrt(2) sd'(r) / sd (N(f, sd^2)'s Fisher in sd is 2/sd^2)."""
        if not self.heteroscedastic:
            return jnp.broadcast_to(1.0 / self.sd, out.shape)
        r = out[..., out.shape[-1] // 2 :]
        sd = self.scale(out)
        return jnp.concatenate([1.0 / sd, math.sqrt(2) * SD_SLOPE * jax.nn.sigmoid(r) / sd], -1)

    def loss(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """The inner-loop loss: mean over points of sum_d (y - f)^2, the MSE as in the papers (the NLL
        is this / (2 sd^2) + const, so step sizes do not depend on the noise sd)."""
        return jnp.mean(jnp.sum(jnp.square(y - self.mean(out)), -1))

    def mean(self, out: jax.Array) -> jax.Array:
        return out[..., : out.shape[-1] // 2] if self.heteroscedastic else out

    def task_metrics(self, mean: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """Per-task MSE of the predictive mean (mean over points and outputs)."""
        return {"mse": jnp.mean(jnp.square(mean - y), axis=(-2, -1))}

    def task_loss(self, mean: jax.Array, y: jax.Array) -> jax.Array:
        """Per-task loss of the predictive mean on a set: its MSE (the inner loop's loss)."""
        return self.task_metrics(mean, y)["mse"]

    def log_prob(self, f: jax.Array, y: jax.Array) -> jax.Array:
        """Pointwise log p(y | f) = sum_d log N(y_d; f_d, sd^2), shape f.shape[:-1] (one value per point;
        sd a number or an array broadcasting with f, as `at` gives it); a diverged task's non-finite f
        gives a non-finite value (reported as null), not a validation error."""
        return jnp.sum(dist.Normal(f, self.sd, validate_args=False).log_prob(y), -1)


@dataclass(frozen=True)
class Categorical:
    """y ~ Categorical(logits = f); the inner loss is the mean cross-entropy."""

    draw_sites: ClassVar[tuple[str, ...]] = ()

    def out_dim(self, y_dim: int) -> int:
        return y_dim

    def in_model(self) -> Categorical:
        return self

    def at(self, params: dict, draws: dict | None = None) -> Categorical:
        return self

    def sites(self, out: jax.Array) -> dict[str, jax.Array]:
        return {"f": self.mean(out)}

    def dist(self, out: jax.Array) -> dist.Distribution:
        return dist.Categorical(logits=out)

    def loss(self, out: jax.Array, y: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), -1))

    def mean(self, out: jax.Array) -> jax.Array:
        return jax.nn.softmax(out)

    def task_metrics(self, mean: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """Per-task accuracy and NLL of the predictive class probabilities."""
        y = y.astype(jnp.int32)
        p_true = jnp.take_along_axis(mean, y[..., None], -1)[..., 0]
        return {
            "accuracy": jnp.mean(jnp.argmax(mean, -1) == y, -1),
            "nll": -jnp.mean(jnp.log(jnp.clip(p_true, 1e-12)), -1),
        }

    def task_loss(self, mean: jax.Array, y: jax.Array) -> jax.Array:
        """Per-task loss of the predictive class probabilities on a set: their NLL (cross-entropy)."""
        return self.task_metrics(mean, y)["nll"]

    def log_prob(self, f: jax.Array, y: jax.Array) -> jax.Array:
        """Pointwise log p(y | f) = log f_y for class probabilities f (the site "f"), one value per point."""
        labels = jnp.broadcast_to(y.astype(jnp.int32), f.shape[:-1])  # y without the draw axes of f
        p = jnp.take_along_axis(f, labels[..., None], -1)[..., 0]
        return jnp.log(jnp.clip(p, 1e-30))


def make_likelihood(cfg: ModelConfig) -> Gaussian | Categorical:
    """The [model] likelihood, with the observation sd that model.noise chooses (module docstring)."""
    if cfg.likelihood == "categorical":
        return Categorical()
    learned = NOISE_SITE if cfg.noise == "learned" else None
    return Gaussian(cfg.noise_sd, learned, heteroscedastic=cfg.noise == "heteroscedastic")
