"""The contract between the engine and a method file: a NumPyro model, a guide, and how to fit them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

Requires = Mapping[str, tuple[str, ...]]  # a method's supported [model] settings: {dotted key: values}


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

    model(batch, inner_steps=None, training=True): the joint over the batch; observes batch.y_query
      and samples it when y_query is None; records the predictive mean as the deterministic site "f".
      `inner_steps=None` means the training number of steps; prediction passes the test-time number
      and training=False (training-only terms, such as regularizers, are left out).
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
    sampler: (params, batch, key, inner_steps, num_samples) -> {"y": (S, T, n, d), "f": ...}, the
      method's own posterior predictive sampler, replacing numpyro.infer.Predictive over model and guide
      when the S draws come out of one joint computation (SVGD particles, the states of an MCMC chain)
      rather than S independent runs of the model; batch.y_query is withheld (None) as for Predictive.
    draw_check: the model records at prediction, per draw, each task's support loss at the draw's start and
      after adaptation (sites.record_draw_check); the engine then counts the draws that blow up (loss
      ends above its start) and, with eval.blown_up_draws = "reject", replaces them by accepted draws.
    likelihood: the observation model the model's "y" site uses (bayesmeta.likelihoods: Gaussian or
      Categorical, observed through sites.observe, which registers its parameters and records "f" and
      its `draw_sites`); `likelihood.at(params, draws)` is the observation model of y given a draw's f
      at fitted parameters and predictive draws (a learned noise sd; a heteroscedastic head's per-point
      sd), from which the engine computes calibration and the pointwise log-likelihood.
    inner_loop: False for a method whose prediction does not depend on `inner_steps` (it reads the support
      set in one pass: metric, memory, graph and conditional-process learners); the evaluation then
      computes one step count and copies it to the others (tests check the declaration).
    episode_metrics: (params, batch, key) -> {name: (T,) per-task values}, metrics of the method's own
      protocol on labelled held-out episodes (batch.y_query given), which the engine summarizes over
      tasks into metrics.json `episode_metrics.<name>` and a table in summary.md (e.g. a sequence
      learner's accuracy at the n-th presentation of a class).
    """

    name: str
    model: Callable[..., None]
    guide: Callable[..., None]
    likelihood: Any = field(kw_only=True)
    elbo: Literal["trace", "meanfield"] = "trace"
    predict_with_guide: bool = True
    global_latents: tuple[str, ...] = ()
    kl: Callable[[dict], Any] | None = None
    kl_weight: float | None = None
    probe: Callable[[dict], Probe] | None = None
    sampler: Callable[..., dict] | None = None
    draw_check: bool = False
    inner_loop: bool = True
    episode_metrics: Callable[..., dict] | None = None


def no_guide(*args: object, **kwargs: object) -> None:
    """The empty guide: every latent is a point estimate held in numpyro.param (empirical Bayes)."""


class Context(NamedTuple):
    """What a method may know of the training protocol: meta-training tasks n and query points K
    (the PAC-Bayes bound's n and K, from which MR(W) can derive its beta), and the number of classes
    of a classification family's meta-training split (for pre-training baselines); and the simulator of
    a family of MDPs (bayesmeta.tasks.Environment), for methods that collect rollouts in their model."""

    n_tasks: int = 1
    n_query: int = 1
    n_classes: int | None = None
    environment: Any = None


@runtime_checkable
class MethodSpec(Protocol):
    """A method as the registry knows it (one per name): its options and how to build it.

    Params: a frozen dataclass of the method's options ([model.params]), fields declared with
      bayesmeta.config.opt (default, bounds, doc); the docs and the resolved config list them.
    requires: the [model] settings the method supports, as {dotted key under model: allowed values}
      (e.g. {"net.kind": ("mlp",)}); the registry refuses any other value, naming the key, and the
      options reference lists them. {} accepts every setting.
    check(cfg, params) -> a one-line config problem with the options (e.g. "model.params.x: ...") or None.
    build(cfg, params, x_dim, y_dim, context) -> Method.
    """

    Params: ClassVar[type]
    requires: ClassVar[Requires]

    def check(self, cfg: Any, params: Any) -> str | None: ...

    def build(self, cfg: Any, params: Any, x_dim: int, y_dim: int, context: Context) -> Method: ...


class Spec:
    """A base for method specs: no options, no required settings and nothing to check unless the
    subclass says otherwise."""

    @dataclass(frozen=True)
    class Params:
        pass

    requires: ClassVar[Requires] = {}

    @staticmethod
    def check(cfg: Any, params: Any) -> str | None:
        return None
