"""PLATIPUS, probabilistic MAML (Finn, Xu & Levine 2018, METHODS 3).

Learned Theta = {mu_theta, sigma_theta, v_q, gamma_p, gamma_q}; per task i:

    model   theta_i ~ p(theta | D_i)  = N(mu - gamma_p grad L(mu, D_i), sigma_theta^2)   learned prior
            phi_i = GD_s(theta_i; D_i);  y*_i ~ p(y | f(x*_i; phi_i))
    guide   theta_i ~ q(theta | D*_i) = N(mu - gamma_q grad L(mu, D*_i), v_q)            reads the query

loss = mean query NLL + lambda * mean_i KL(q(theta_i | D*_i) || p(theta_i | D_i)), the NLL a mean over the
K query points of a task and over tasks (the project's convention, sites.observe). The default lambda =
1/K makes K * loss the negative ELBO of log p(D*_i | D_i) averaged over tasks, the sum of the K points'
NLL plus one KL per task: the weight the hierarchical model itself implies. (The 0.1 of earlier versions
came from a port with another likelihood scale; it equals 1/K only at K = 10.) At meta-test the
guide cannot be used (no query labels): Predictive samples theta_i from the model's p(theta | D_i),
adapts, and predicts, S times: a posterior predictive over functions for ambiguous tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import scale

from bayesmeta.adapt import InnerLoop
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Spec
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree, record_draw_check, site_names
from bayesmeta.tasks import TaskBatch


def kl_weight(p: PLATIPUS.Params, context: Context) -> float:
    """lambda: the option if set, else 1/K for K query points per task (the ELBO in mean-NLL units)."""
    return 1.0 / context.n_query if p.kl_weight is None else p.kl_weight


@dataclass(frozen=True)
class PLATIPUS(Spec):
    @dataclass(frozen=True)
    class Params:
        kl_weight: float | None = opt(
            None,
            gt=0,
            doc="lambda, the weight of KL(q(theta|D*) || p(theta|D)) beside the mean query NLL; unset: 1/K "
            "for K query points per task, the exact ELBO",
        )
        gamma_init: float = opt(0.01, doc="initial gamma_p and gamma_q")
        log_sd_init: float = opt(-4.0, doc="initial log sigma_theta and log sqrt(v_q) (plus N(0,1) jitter)")

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = make_likelihood(cfg)
        net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
        inner = InnerLoop.from_config(cfg, adapt="all")
        lam = kl_weight(p, context)

        def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            return lik.loss(net.apply(params, x), y)

        def log_sd_init(key: jax.Array) -> dict:
            shapes = jax.eval_shape(net.init, key)
            leaves, treedef = jax.tree.flatten(shapes)
            keys = jax.random.split(key, len(leaves))
            return jax.tree.unflatten(
                treedef,
                [p.log_sd_init + jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)],
            )

        def sample_theta(loc: dict, log_sd: dict, n_tasks: int) -> dict:
            """theta_i ~ N(loc_i, exp(log_sd)^2) per leaf under plate(tasks), KL weight lambda / T."""
            leaves, treedef = jax.tree.flatten(loc)
            names = site_names("theta", loc)
            sds = jax.tree.leaves(log_sd)
            with numpyro.plate("theta_tasks", n_tasks, dim=-1), scale(scale=lam / n_tasks):
                out = [
                    numpyro.sample(n, dist.Normal(m, jnp.exp(s)).to_event(m.ndim - 1))
                    for n, m, s in zip(names, leaves, sds, strict=True)
                ]
            return jax.tree.unflatten(treedef, out)

        def shifted(mu: dict, gamma: jax.Array, x: jax.Array, y: jax.Array) -> dict:
            """mu - gamma grad L(mu, D_i) for every task i (leading task axis)."""
            g = jax.vmap(jax.grad(task_loss), in_axes=(None, 0, 0))(mu, x, y)
            return jax.tree.map(lambda m, gi: m - gamma * gi, mu, g)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            mu = param_tree("mu", net.init)
            log_sd = param_tree("log_sd_theta", log_sd_init)
            gamma_p = numpyro.param("gamma_p", jnp.asarray(p.gamma_init))
            theta = sample_theta(
                shifted(mu, gamma_p, batch.x_support, batch.y_support), log_sd, batch.n_tasks
            )
            phi, _ = inner(task_loss, theta, batch.x_support, batch.y_support, inner_steps, per_task=True)
            if not training:  # did this draw's adaptation lower its support loss? (eval.blown_up_draws)
                losses = jax.vmap(task_loss)
                record_draw_check(
                    losses(theta, batch.x_support, batch.y_support),
                    losses(phi, batch.x_support, batch.y_support),
                )
            observe(lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

        def guide(batch: TaskBatch, inner_steps: int | None = None) -> None:
            mu = param_tree("mu", net.init)
            log_sd_q = param_tree("log_sd_q", log_sd_init)
            gamma_q = numpyro.param("gamma_q", jnp.asarray(p.gamma_init))
            sample_theta(shifted(mu, gamma_q, batch.x_query, batch.y_query), log_sd_q, batch.n_tasks)

        return Method(
            "platipus",
            model,
            guide,
            elbo="meanfield",
            predict_with_guide=False,
            likelihood=lik,
            draw_check=True,
        )
