"""Bayesian MAML (Yoon, Kim, Dia, Kim, Bengio & Ahn 2018, METHODS 9): SVGD particles and the chaser loss.

    Theta_0 = {theta_0^m}_{m=1..M}            meta-parameters: M initial particles (numpyro.param)
    log pi_D(theta) = -L(theta; D) + log N(theta; 0, s^2) / |D|        the per-task SVGD target
    Theta_i^n   = SVGD_n(Theta_0; D_i)                                  chaser: n steps on the support
    Theta_i^n+s = SVGD_s(Theta_i^n; D_i u D*_i)                         leader: s more on support + query
    loss(Theta_0) = mean_i sum_m ||theta_i^n,m - sg(theta_i^n+s,m)||^2  the chaser loss (paper, Alg. 2)
    y*_i ~ 1/M sum_m p(y | f(x*_i; theta_i^n,m))                        prediction: the particles' mixture

One SVGD step moves every particle x_i (flattened, jax.flatten_util.ravel_pytree) by eps phi(x_i),

    phi(x_i) = 1/M sum_j [k(x_j, x_i) grad log pi(x_j) + grad_{x_j} k(x_j, x_i)]    (Liu & Wang 2016, eq. 8)

with the RBF kernel k(x, y) = exp(-||x - y||^2 / h) and the median heuristic h = med(||x_i - x_j||)^2 /
log M (numpyro.contrib.einstein's RBFKernel; h = 1 for M = 1; h is held constant in the meta-gradient,
as there). At M = 1 the repulsion vanishes and the step is MAML's gradient step on L.

Scale of the target: L is the likelihood's inner-loop loss (lik.loss, a mean over the set's points, as
every method's inner loop uses it) and the prior is divided by |D|, so pi_D = p(theta | D)^(1/|D|), the
posterior tempered by the number of points, whenever L is the per-point NLL (Categorical; Gaussian
with noise sd^2 = 1/2, up to a constant). At this scale the SVGD step size is MAML's inner step size
(default model.inner_lr). The leader's target uses |D u D*| points.

The authors' target (model.params.target = "authors"; jsikyoon/bmaml, bnn.py and bmaml.py, read for
issue #16). Each particle also carries log precisions: v = (theta, log lambda, log gamma), started at
lambda = 1 and gamma = 100 (their m_l = 1, m_g = 0.01) plus N(0, 0.001^2) noise, and SVGD moves v
towards

    log pi_D(v) = sum_{n,k} [log gamma / 2 - gamma (y_nk - f_k(x_n; theta))^2 / 2]     all points, summed
                + P log lambda / 2 - lambda ||theta||^2 / 2                            N(theta; 0, 1/lambda)
                + log Gamma(gamma; 2, 0.2) + log gamma + log Gamma(lambda; 2, 2) + log lambda

(shape and rate; "+ log" is the log-parameterisation's Jacobian; constants dropped). The chaser loss
leaves the log precisions out, as theirs does (they are meta-learned through the weights' path). At
gamma = 100 a step on 10 points is about 500x the tempered target's, at the same step size (their
follow_lr = leader_lr = 0.001). Gaussian likelihood only; prediction keeps the likelihood's fixed noise
(model.noise_sd) for "y". Their regression runs use 10 particles and one chaser step (model.params.particles,
model.inner_steps); their kernel's bandwidth is the median over the pairs i < j, ours over all M^2
entries (numpyro's).

Why not numpyro.contrib.einstein's SteinVI: it is an outer inference engine that moves the particles
of a guide's parameters, one optimizer step per SVI step; BMAML needs a differentiable SVGD inner loop
per task inside one jitted SVI step (lax.scan over steps, vmapped over tasks, the meta-gradient flowing
through it). So the step is the few lines of pure JAX below; its kernel is RBFKernel's (a test checks
the Gram matrix against numpyro's).

In the engine: training observes nothing and adds numpyro.factor("chaser", -loss) with the empty guide
(empirical Bayes over Theta_0), so the SVI loss is the chaser loss. Prediction is the declared
`sampler` (Method.sampler): one SVGD run of `inner_steps` steps on the support, and draw s is particle
s mod M (S a multiple of M weighs the particles equally; eval.samples = 1 reads particle 1 alone, as does
the training-time quick metric); "f" is that particle's predictive mean (class probabilities for
Categorical) and "y" a draw from its likelihood. The model itself, at prediction, picks a particle
uniformly per task (latent site "particle"), the same mixture one draw at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.flatten_util import ravel_pytree

from bayesmeta.adapt import clip_norm
from bayesmeta.config import ConfigError, ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Requires, Spec, no_guide
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch

LogDensity = Callable[[jax.Array], jax.Array]
# the authors' target (module docstring): Gamma(shape, rate) priors of the noise precision gamma and the
# weight precision lambda, and their starting values (jsikyoon/bmaml's flags a_g, b_g, a_l, b_l, m_g, m_l)
GAMMA_PRIOR, LAMBDA_PRIOR = (2.0, 0.2), (2.0, 2.0)
GAMMA_INIT, LAMBDA_INIT = 100.0, 1.0


def gamma_log_density(log_x: jax.Array, shape: float, rate: float) -> jax.Array:
    """log Gamma(x; shape, rate) + log x at x = exp(log_x), without its normaliser: the density of log x."""
    return shape * log_x - rate * jnp.exp(log_x)


def authors_log_density(
    err: jax.Array, theta: jax.Array, log_lambda: jax.Array, log_gamma: jax.Array
) -> jax.Array:
    """The authors' per-task SVGD target (module docstring) at residuals err = y - f(x; theta), without
    constants: Gaussian log-likelihood summed at precision gamma, N(theta; 0, 1/lambda), Gamma priors."""
    llik = jnp.sum(0.5 * log_gamma - 0.5 * jnp.exp(log_gamma) * jnp.square(err))
    prior = 0.5 * theta.size * log_lambda - 0.5 * jnp.exp(log_lambda) * jnp.sum(jnp.square(theta))
    return (
        llik
        + prior
        + gamma_log_density(log_gamma, *GAMMA_PRIOR)
        + gamma_log_density(log_lambda, *LAMBDA_PRIOR)
    )


def sq_distances(x: jax.Array) -> jax.Array:
    """||x_i - x_j||^2 (M, M) for particles x (M, D) as |c_i|^2 + |c_j|^2 - 2 c_i.c_j of the centred c = x -
    mean(x) (one M x D x M matmul, no (M, M, D) difference tensor, which dominated the step's time and
    memory; centring keeps the cancellation small), exactly 0 on the diagonal and never below 0."""
    c = x - jnp.mean(x, 0)
    sq = jnp.sum(jnp.square(c), -1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (c @ c.T), 0.0)
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)


def median_bandwidth(x: jax.Array) -> jax.Array:
    """h = med_ij(||x_i - x_j||)^2 / log M over all M^2 pairs (the diagonal included), 1 for M = 1, plus
    float eps (numpyro.contrib.einstein.stein_util.median_bandwidth); a constant for gradients."""
    m = x.shape[0]
    if m == 1:
        return jnp.asarray(1.0, x.dtype)
    d = jnp.sqrt(sq_distances(lax.stop_gradient(x)))
    return jnp.median(d) ** 2 / jnp.log(m) + jnp.finfo(x.dtype).eps


def rbf_gram(x: jax.Array, h: jax.Array) -> jax.Array:
    """K_ij = exp(-||x_i - x_j||^2 / h) for particles x (M, D)."""
    return jnp.exp(-sq_distances(x) / h)


def svgd_direction(x: jax.Array, grads: jax.Array) -> jax.Array:
    """phi(x_i) = 1/M sum_j [K_ji grad log p(x_j) + grad_{x_j} K_ji], with grad_{x_j} K_ji =
    2 K_ji (x_i - x_j) / h (Liu & Wang 2016, eq. 8; RBF kernel, median bandwidth)."""
    h = median_bandwidth(x)
    k = rbf_gram(x, h)
    repulsion = 2.0 / h * (x * jnp.sum(k, 1, keepdims=True) - k @ x)
    return (k @ grads + repulsion) / x.shape[0]


def svgd(
    log_p: LogDensity,
    x: jax.Array,
    steps: int,
    lr: float,
    first_order: bool = False,
    remat: str = "none",
    clip: float = 0.0,
) -> jax.Array:
    """`steps` SVGD steps x <- x + lr phi(x) on particles x (M, D) towards density exp(log_p), in
    lax.scan. `first_order` stops the gradient through phi (d x_n / d x_0 = I); `remat` names a
    jax.checkpoint policy for the step; `clip` > 0 clips each particle's grad log p to that norm before
    the kernel averages them (model.inner_clip)."""

    def body(x: jax.Array, _: None) -> tuple[jax.Array, None]:
        grads = jax.vmap(lambda xi: clip_norm(jax.grad(log_p)(xi), clip))(x)
        phi = svgd_direction(x, grads)
        if first_order:
            phi = lax.stop_gradient(phi)
        return x + lr * phi, None

    if remat != "none":
        body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, remat))
    return lax.scan(body, x, None, length=steps)[0]


def chaser_loss(chaser: jax.Array, leader: jax.Array) -> jax.Array:
    """mean_i sum_m ||chaser_im - sg(leader_im)||^2 over particles (T, M, D) (BMAML, Alg. 2)."""
    diff = chaser - lax.stop_gradient(leader)
    return jnp.mean(jnp.sum(jnp.square(diff), axis=(1, 2)))


def cycle(draws: int, particles: int) -> jax.Array:
    """Particle index of each of `draws` predictive draws: s mod M."""
    return jnp.arange(draws) % particles


@dataclass(frozen=True)
class BMAML(Spec):
    """Bayesian MAML: M SVGD particles per task, meta-trained by the chaser loss."""

    @dataclass(frozen=True)
    class Params:
        particles: int = opt(5, ge=1, doc="M, SVGD particles per task (meta-learned initial particles)")
        leader_steps: int = opt(
            1, ge=0, doc="s, the leader's SVGD steps on support + query beyond the chaser's n = inner_steps"
        )
        svgd_lr: float | None = opt(None, gt=0, doc="SVGD step size; default model.inner_lr")
        prior_sd: float = opt(
            0.0, ge=0, doc="sd of the N(0, s^2) prior in the per-task SVGD target (scaled by 1/|D|); 0 = none"
        )
        target: str = opt(
            "tempered",
            choices=["tempered", "authors"],
            doc="per-task SVGD target: 'tempered', -L(theta; D) + log N(theta; 0, s^2) / |D| at the inner "
            "loop's per-point scale; 'authors', jsikyoon/bmaml's: learned noise and weight precisions per "
            "particle under Gamma priors, the Gaussian log-likelihood summed over the points",
        )

    # particles are whole networks; the chaser loss has no likelihood to fit an sd to; 'sqrt' remat
    # does not apply to the SVGD loop (a jax.checkpoint policy does)
    requires: ClassVar[Requires] = {
        "adapt": ("all",),
        "noise": ("fixed",),
        "remat": ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"),
    }

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        authors = p.target == "authors"
        if authors and (cfg.likelihood != "gaussian" or p.prior_sd > 0):
            raise ConfigError(
                "model.params.target: 'authors' is the Gaussian regression target with its own priors; it "
                f"needs model.likelihood = 'gaussian' (got {cfg.likelihood!r}) and model.params.prior_sd = 0 "
                f"(got {p.prior_sd}); allowed targets: 'tempered', 'authors'"
            )
        lr = cfg.inner_lr if p.svgd_lr is None else p.svgd_lr
        m = p.particles
        shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0))
        theta0, unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        d = theta0.size  # a particle's weights: v[:d]; the authors' target appends log lambda, log gamma

        def init_particles(key: jax.Array) -> dict:
            """M independent draws of the net's initialiser, stacked on a leading particle axis (a loop,
            not vmap: eagerly, in svi.init, it reuses the compiled ops of one net.init); for the authors'
            target, with each particle's (log lambda, log gamma) beside them."""
            draws = [net.init(k) for k in jax.random.split(key, m)]
            tree = jax.tree.map(lambda *a: jnp.stack(a), *draws)
            if not authors:
                return tree
            start = jnp.log(jnp.array([LAMBDA_INIT, GAMMA_INIT]))
            return {
                "net": tree,
                "log_precisions": start + 0.001 * jax.random.normal(jax.random.fold_in(key, m), (m, 2)),
            }

        def flat(particles: dict) -> jax.Array:
            """(M, D) from a params tree with a leading particle axis (D = d, or d + 2 for the authors')."""
            if authors:
                return jnp.concatenate([flat_weights(particles["net"]), particles["log_precisions"]], 1)
            return flat_weights(particles)

        def flat_weights(tree: dict) -> jax.Array:
            return jax.vmap(lambda t: ravel_pytree(t)[0])(tree)

        def weights(v: jax.Array) -> dict:
            """The net's parameters of one particle v."""
            return unravel(v[:d])

        def log_target(x: jax.Array, y: jax.Array) -> LogDensity:
            """log pi_D(v): the tempered target -L(theta; D) + log N(theta; 0, s^2) / |D| (without
            constants), or the authors' (authors_log_density)."""

            def log_p(v: jax.Array) -> jax.Array:
                if authors:
                    return authors_log_density(y - net.apply(weights(v), x), v[:d], v[d], v[d + 1])
                out = -lik.loss(net.apply(weights(v), x), y)
                if p.prior_sd > 0:
                    out -= 0.5 * jnp.sum(jnp.square(v)) / p.prior_sd**2 / x.shape[0]
                return out

            return log_p

        @partial(jax.jit, static_argnums=3)
        def adapt(x0: jax.Array, x: jax.Array, y: jax.Array, steps: int) -> jax.Array:
            """SVGD on every task's set (T, n, ...) from x0 (M, D) or per-task x0 (T, M, D)."""
            axis = 0 if x0.ndim == 3 else None
            return jax.vmap(
                lambda x0_i, xi, yi: svgd(
                    log_target(xi, yi), x0_i, steps, lr, cfg.first_order, cfg.remat, cfg.inner_clip
                ),
                in_axes=(axis, 0, 0),
            )(x0, x, y)

        def outputs(x: jax.Array, xq: jax.Array) -> jax.Array:
            """Net outputs of every particle on every task's query inputs: (T, M, n, d)."""
            return jax.vmap(lambda xi, q: jax.vmap(lambda t: net.apply(weights(t), q))(xi))(x, xq)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            x0 = flat(param_tree("particles", init_particles))
            steps = cfg.inner_steps if inner_steps is None else inner_steps
            chaser = adapt(x0, batch.x_support, batch.y_support, steps)
            if training and batch.y_query is not None:
                both_x = jnp.concatenate([batch.x_support, batch.x_query], 1)
                both_y = jnp.concatenate([batch.y_support, batch.y_query], 1)
                leader = adapt(chaser, both_x, both_y, p.leader_steps)
                numpyro.factor("chaser", -chaser_loss(chaser[..., :d], leader[..., :d]))
                return
            out = outputs(chaser, batch.x_query)
            with numpyro.plate("particle_tasks", batch.n_tasks):
                pick = numpyro.sample("particle", dist.Categorical(logits=jnp.zeros(m)))
            observe(lik, jnp.take_along_axis(out, pick[:, None, None, None], 1)[:, 0], batch.y_query)

        def sampler(
            params: dict, batch: TaskBatch, key: jax.Array, inner_steps: int, num_samples: int
        ) -> dict:
            """S draws from one SVGD run per task: draw s is particle s mod M."""
            x0 = flat(tree_from_params("particles", init_particles, params))
            out = outputs(adapt(x0, batch.x_support, batch.y_support, inner_steps), batch.x_query)
            out = jnp.moveaxis(out[:, cycle(num_samples, m)], 1, 0)  # (S, T, n, d)
            return {"f": lik.mean(out), "y": lik.dist(out).sample(key)}

        return Method("bmaml", model, no_guide, likelihood=lik, sampler=sampler)
