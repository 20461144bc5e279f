"""Prototypical networks (Snell, Swersky & Zemel 2017; METHODS 8) as a NumPyro model.

    c_k = mean of f_theta(x) over the support images of class k          (prototypes)
    p(y* = k | x*, D) = softmax_k(-||f_theta(x*) - c_k||^2)              (squared Euclidean)

theta is a point estimate (numpyro.param); the ELBO with the empty guide is the mean query
log-likelihood, the episode loss of the paper. Predictive returns the class probabilities as "f".
No inner loop: `inner_steps` is accepted and ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bayesmeta.config import ModelConfig
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, no_guide
from bayesmeta.models.baselines import Classifier
from bayesmeta.nets import embedding, make_net, task_vmap
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def prototype_logits(z_s: jax.Array, y_s: jax.Array, z_q: jax.Array, ways: int) -> jax.Array:
    """-||z_q - c_k||^2 for class means c_k of the support embeddings (one task: z (n, d), y (n,))."""
    onehot = jax.nn.one_hot(y_s, ways)
    protos = (onehot.T @ z_s) / jnp.maximum(onehot.sum(0), 1.0)[:, None]
    return -jnp.sum(jnp.square(z_q[:, None, :] - protos[None]), -1)


class ProtoNet(Classifier):
    """Prototypical networks on the configured net's features (conv4: set downsample = "maxpool" for
    the paper's embedding); the head of the net is not used."""

    @staticmethod
    def build(cfg: ModelConfig, params: object, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)

        def embed(theta: dict, x: jax.Array) -> jax.Array:
            """Embeddings of T sets (T, n, d) with the shared weights (batch norm per set)."""
            return task_vmap(net, net.features, theta, x)

        init, _ = embedding(net, x_dim)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)

            z_s, z_q = embed(theta, batch.x_support), embed(theta, batch.x_query)
            logits = jax.vmap(prototype_logits, (0, 0, 0, None))(z_s, batch.y_support, z_q, y_dim)
            observe(lik, logits, batch.y_query)

        return Method(name="protonet", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
