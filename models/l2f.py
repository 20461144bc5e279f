"""L2F, Learning to Forget (Baik, Hong & Lee, CVPR 2020; METHODS 5): a task-conditioned attenuation of
the initialisation, then MAML's inner loop.

    theta, attenuator g                      meta-parameters (numpyro.param)
    e_i^j = mean of grad_theta^j L(theta, D_i)   one number per adapted parameter tensor j (L of them)
    gamma_i = g(e_i) = sigmoid(W2 relu(W1 e_i + b1) + b2)   in (0, 1)^L
    phi_i = GD_s(gamma_i * theta; D_i)        layer j of the task's initialisation is gamma_i^j theta^j
    y*_i ~ p(y | f(x*_i; phi_i))

In the Bayesian reading gamma_i * theta is a task-conditioned prior mean shrunk towards zero. Ablations
(`attenuation`): "layer" learns one gamma per tensor without task conditioning, "network" one scalar;
`sigmoid = false` drops the final sigmoid (their Table 6). gamma starts at `gamma_init` for every task
(g's last layer starts at zero weights and bias logit(gamma_init)): near 1, training starts close to
MAML's initialisation and learns how much to forget, rather than from a network whose weights are halved
(sigmoid(0) = 0.5, what a default-initialised g would give); 0.9 rather than 0.99 keeps the sigmoid's
slope gamma (1 - gamma) at 0.09, not 0.01, so g still learns at the meta learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
from jax import lax
from numpyro import handlers

from bayesmeta.adapt import InnerLoop, split
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Method, Probe, Spec, no_guide
from bayesmeta.models.maml import LEARNED_LR, LEARNED_LR_DOC, check_rates, inner_rates
from bayesmeta.nets import dense, dense_init, make_net
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch


def layer_means(grads: dict) -> jax.Array:
    """The task embedding of L2F: the mean of each gradient tensor, in tree order, (L,)."""
    return jnp.stack([jnp.mean(g) for g in jax.tree.leaves(grads)])


def attenuator_init(n: int, pre_init: float, key: jax.Array) -> dict:
    """g = Linear(L, L) -> ReLU -> Linear(L, L): Glorot first layer; zero last weights, bias pre_init."""
    return {
        "layer_0": dense_init(key, n, n),
        "head": {"w": jnp.zeros((n, n)), "b": jnp.full((n,), pre_init)},
    }


def attenuator(g: dict, e: jax.Array) -> jax.Array:
    """The pre-activation of gamma: W2 relu(W1 e + b1) + b2."""
    return dense(g["head"], jax.nn.relu(dense(g["layer_0"], e)))


def attenuate(theta: dict, adapt: str, gamma: jax.Array) -> dict:
    """theta with its adapted tensors scaled: tensor j (tree order of the adapted part) by gamma[j]."""
    fast, slow = split(theta, adapt)
    leaves, treedef = jax.tree.flatten(fast)
    return {**slow, **jax.tree.unflatten(treedef, [g * leaf for g, leaf in zip(gamma, leaves, strict=True)])}


@dataclass(frozen=True)
class L2F(Spec):
    @dataclass(frozen=True)
    class Params:
        attenuation: str = opt(
            "task",
            choices=["task", "layer", "network"],
            doc="gamma from the task's gradients (L2F), learned per layer, or one learned scalar",
        )
        sigmoid: bool = opt(True, doc="squash gamma into (0, 1) (false: their Table 6 ablation)")
        gamma_init: float = opt(0.9, gt=0, doc="gamma at initialisation (every task, every layer)")
        learned_lr: str = opt("none", choices=LEARNED_LR, doc=LEARNED_LR_DOC)
        lr_init: float | None = opt(None, gt=0, doc="initial learned inner rate; default model.inner_lr")

    @staticmethod
    def check(cfg: ModelConfig, p: Params) -> str | None:
        if p.sigmoid and p.gamma_init >= 1:
            return f"model.params.gamma_init: expected < 1 with sigmoid = true, got {p.gamma_init}"
        return check_rates(cfg, p.learned_lr)

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: object = None) -> Method:
        lik = make_likelihood(cfg)
        net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
        inner = InnerLoop.from_config(cfg)
        n_layers = len(jax.tree.leaves(split(jax.eval_shape(net.init, jax.random.PRNGKey(0)), cfg.adapt)[0]))
        squash = jax.nn.sigmoid if p.sigmoid else (lambda a: a)
        pre_init = math.log(p.gamma_init / (1 - p.gamma_init)) if p.sigmoid else p.gamma_init

        def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            return lik.loss(net.apply(params, x), y)

        def gammas(theta: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            """gamma (T, L) for the tasks' support sets."""
            n_tasks = x.shape[0]
            if p.attenuation == "network":
                pre = numpyro.param("l2f.gamma", jnp.asarray(pre_init))
                return jnp.broadcast_to(squash(pre), (n_tasks, n_layers))
            if p.attenuation == "layer":
                pre = numpyro.param("l2f.gamma", jnp.full((n_layers,), pre_init))
                return jnp.broadcast_to(squash(pre), (n_tasks, n_layers))
            g = param_tree("l2f.attenuator", lambda key: attenuator_init(n_layers, pre_init, key))
            fast, slow = split(theta, cfg.adapt)

            def embed(xi: jax.Array, yi: jax.Array) -> jax.Array:  # second-order unless first_order
                grads = jax.grad(lambda f: task_loss({**slow, **f}, xi, yi))(fast)
                return layer_means(lax.stop_gradient(grads) if cfg.first_order else grads)

            return squash(attenuator(g, jax.vmap(embed)(x, y)))

        def adapt(theta: dict, x: jax.Array, y: jax.Array, inner_steps: int | None = None) -> dict:
            """phi_i = GD(gamma_i * theta; D_i) for every task (numpyro.param sites: g, learned rates)."""
            gamma = numpyro.deterministic("gamma", gammas(theta, x, y))
            init = jax.vmap(lambda g: attenuate(theta, cfg.adapt, g))(gamma)
            lr = inner_rates(cfg, p.learned_lr, p.lr_init, theta)
            return inner(task_loss, init, x, y, inner_steps, per_task=True, lr=lr)[0]

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", net.init)
            phi = adapt(theta, batch.x_support, batch.y_support, inner_steps)
            observe(lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

        def probe(params: dict) -> Probe:
            """theta is the shared initialisation; adaptation includes the task's attenuation."""
            fitted = handlers.substitute(adapt, data=params)  # g and the learned rates as fitted
            theta = tree_from_params("theta", net.init, params)
            return Probe(theta, fitted, task_loss, task_loss, net.features)

        return Method(name="l2f", model=model, guide=no_guide, probe=probe, likelihood=lik)
