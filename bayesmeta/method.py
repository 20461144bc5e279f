"""The contract between the engine and a method file: a NumPyro model, a guide, and how to fit them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple


class Probe(NamedTuple):
    """What landscape diagnostics need from a gradient-based method, at given meta-parameters.

    theta: the initialisation the inner loop starts from (a pytree).
    adapt(theta, x_support, y_support) -> phi: the training inner loop on T tasks (leading task axis),
      differentiable in theta as the method trains it (first-order methods stop gradients inside).
    support_loss(params, x, y), query_loss(params, x, y): one task's inner and outer losses.
    features(params, x) -> (n, d): the representation the head reads, for one task.
    """

    theta: Any
    adapt: Callable[[Any, Any, Any], Any]
    support_loss: Callable[[Any, Any, Any], Any]
    query_loss: Callable[[Any, Any, Any], Any]
    features: Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Method:
    """A meta-learner as a (model, guide) pair over a TaskBatch.

    model(batch, inner_steps=None): the joint over the batch; observes batch.y_query and samples it
      when y_query is None; records the predictive mean as the deterministic site "f".
      `inner_steps=None` means the training number of steps; evaluation passes the test-time number.
    guide(batch, inner_steps=None): the variational family (empty for empirical Bayes / MAP).
    elbo: "trace" (Monte Carlo Trace_ELBO) or "meanfield" (TraceMeanField_ELBO, analytic KL).
    predict_with_guide: draw global latents from the guide at prediction time (False when the guide
      reads the query labels, as PLATIPUS's does).
    global_latents: prefixes of the guide's sample sites that are meta-level (not per task or point);
      their draws form the run's ArviZ posterior group.
    kl: params -> KL(q(theta) || p(theta)) of the stochastic meta-parameters, for the PAC-Bayes bound.
    kl_weight: the beta that weights that KL in training (reported beside the beta the bound implies).
    probe: params -> Probe, for the landscape diagnostics (train.diagnostics_every); gradient-based
      methods with point-estimated meta-parameters provide it.
    """

    name: str
    model: Callable[..., None]
    guide: Callable[..., None]
    elbo: Literal["trace", "meanfield"] = "trace"
    predict_with_guide: bool = True
    global_latents: tuple[str, ...] = ()
    kl: Callable[[dict], Any] | None = None
    kl_weight: float | None = None
    probe: Callable[[dict], Probe] | None = None


def no_guide(*args: object, **kwargs: object) -> None:
    """The empty guide: every latent is a point estimate held in numpyro.param (empirical Bayes)."""
