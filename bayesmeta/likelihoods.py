"""Observation models: the NumPyro distribution of y given network outputs, and its mean loss."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from bayesmeta.config import ModelConfig


@dataclass(frozen=True)
class Gaussian:
    """y ~ N(f, sd^2) per output; with sd = sqrt(1/2) the NLL is the MSE + log(sqrt(pi)). When `learned`
    names a parameter site, the model learns sd there and `at(params)` reads it."""

    sd: float
    learned: str | None = None

    def at(self, params: dict) -> Gaussian:
        """This observation model at fitted parameters (the learned sd, if any)."""
        return Gaussian(params[self.learned]) if self.learned else self

    def dist(self, out: jax.Array) -> dist.Distribution:
        return dist.Normal(out, self.sd).to_event(1)

    def loss(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """The inner-loop loss: mean over points of sum_d (y - f)^2, the MSE as in the papers (the NLL
        is this / (2 sd^2) + const, so step sizes do not depend on the noise sd)."""
        return jnp.mean(jnp.sum(jnp.square(y - out), -1))

    def mean(self, out: jax.Array) -> jax.Array:
        return out

    def task_metrics(self, mean: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """Per-task MSE of the predictive mean (mean over points and outputs)."""
        return {"mse": jnp.mean(jnp.square(mean - y), axis=(-2, -1))}

    def task_loss(self, mean: jax.Array, y: jax.Array) -> jax.Array:
        """Per-task loss of the predictive mean on a set: its MSE (the inner loop's loss)."""
        return self.task_metrics(mean, y)["mse"]

    def log_prob(self, f: jax.Array, y: jax.Array) -> jax.Array:
        """Pointwise log p(y | f) = sum_d log N(y_d; f_d, sd^2), shape f.shape[:-1] (one value per point);
        a diverged task's non-finite f gives a non-finite value (reported as null), not a validation error."""
        return jnp.sum(dist.Normal(f, self.sd, validate_args=False).log_prob(y), -1)


@dataclass(frozen=True)
class Categorical:
    """y ~ Categorical(logits = f); the inner loss is the mean cross-entropy."""

    def at(self, params: dict) -> Categorical:
        return self

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
    return Gaussian(cfg.noise_sd) if cfg.likelihood == "gaussian" else Categorical()
