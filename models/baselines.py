"""Baselines without meta-learning (METHODS 4 and 8).

Fine-tuning: pre-train the network as one classifier over every meta-training class, then for a new
task replace the head by a zero N-way head and take `inner_steps` gradient steps on the support set
(adapting the head, or everything with [model] adapt = "all"). Training observes the episodes' images
under their global class labels (info["classes"]); prediction (y_query withheld) adapts and predicts.
Its probe (landscape diagnostics) starts from the pre-trained body and the zero head.

For regression (a Gaussian likelihood) the targets already share one output space across tasks, so
the network is pre-trained on every training point of every task jointly (Yin et al.'s 2020 "FT"
baseline: one network trained on all instances, then fine-tuned on the task training data), and a new
task starts from the whole pre-trained network, head included. Weight decay (their "FT + weight
decay") is train.optimizer = "adamw" with train.weight_decay.

Nearest neighbour: the query takes the class of the closest support input in Euclidean distance
(pixels on Omniglot); "f" holds softmax(-min distance per class), whose argmax is the 1-NN decision.
It has no parameters to fit: evaluate it without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from bayesmeta.adapt import InnerLoop
from bayesmeta.config import ModelConfig
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Probe, Requires, Spec, no_guide
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch


class Classifier(Spec):
    """What the classification-only methods share: no [model.params] and a categorical likelihood."""

    @dataclass(frozen=True)
    class Params:
        pass

    requires: ClassVar[Requires] = {"likelihood": ("categorical",)}


def global_labels(classes: jax.Array, y: jax.Array) -> jax.Array:
    """Episode labels (T, n) mapped to the split's class ids through classes (T, N)."""
    return jnp.take_along_axis(classes, y, axis=1)


class FineTune(Classifier):
    """Pre-train on all meta-training classes (or, for regression, all training points), fine-tune on
    each task's support set."""

    requires: ClassVar[Requires] = {}  # classification and regression

    @staticmethod
    def build(cfg: ModelConfig, params: object, x_dim: int, y_dim: int, context: Context) -> Method:
        if cfg.likelihood != "categorical":
            return _finetune_regression(cfg, x_dim, y_dim)
        if context.n_classes is None:
            raise ValueError("finetune: the task family must say how many classes it has (n_classes)")
        pretrain = make_net(cfg.net, x_dim, context.n_classes)
        task_net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        inner = InnerLoop.from_config(cfg)

        def zero_head() -> dict:
            shapes = jax.eval_shape(task_net.init, jax.random.PRNGKey(0))["head"]
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            return lik.loss(task_net.apply(p, x), y)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", pretrain.init)
            if inner_steps is None:  # pre-training: every episode image under its global label
                x = jnp.concatenate([batch.x_support, batch.x_query], 1)
                y = jnp.concatenate([batch.y_support, batch.y_query], 1)
                out = jax.vmap(lambda xi: pretrain.apply(theta, xi))(x)
                observe(lik, out, global_labels(batch.info["classes"], y))
                return
            start = {**theta, "head": zero_head()}
            phi, _ = inner(loss, start, batch.x_support, batch.y_support, inner_steps)
            observe(lik, jax.vmap(task_net.apply)(phi, batch.x_query), batch.y_query)

        def probe(params: dict) -> Probe:
            """The landscape diagnostics' view: theta is the pre-trained body with the zero N-way head,
            adapted by model.inner_steps steps on the support set, as at test time."""
            start = {**tree_from_params("theta", pretrain.init, params), "head": zero_head()}

            def adapt(th: dict, x: jax.Array, y: jax.Array) -> dict:
                return inner(loss, th, x, y)[0]

            return Probe(start, adapt, loss, loss, task_net.features)

        return Method(name="finetune", model=model, guide=no_guide, probe=probe, likelihood=lik)


def _finetune_regression(cfg: ModelConfig, x_dim: int, y_dim: int) -> Method:
    """Regression fine-tuning: theta fitted to every training point jointly (no adaptation), then
    `inner_steps` steps on the support set from theta at prediction."""
    net = make_net(cfg.net, x_dim, y_dim)
    lik = make_likelihood(cfg)
    inner = InnerLoop.from_config(cfg)

    def loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return lik.loss(net.apply(p, x), y)

    def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
        theta = param_tree("theta", net.init)
        if inner_steps is None:  # pre-training: every point of every task, as one data set
            x = jnp.concatenate([batch.x_support, batch.x_query], 1)
            y = jnp.concatenate([batch.y_support, batch.y_query], 1)
            observe(lik, jax.vmap(lambda xi: net.apply(theta, xi))(x), y)
            return
        phi, _ = inner(loss, theta, batch.x_support, batch.y_support, inner_steps)
        observe(lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

    def probe(params: dict) -> Probe:
        def adapt(th: dict, x: jax.Array, y: jax.Array) -> dict:
            return inner(loss, th, x, y)[0]

        return Probe(tree_from_params("theta", net.init, params), adapt, loss, loss, net.features)

    return Method(name="finetune", model=model, guide=no_guide, probe=probe, likelihood=lik)


class NearestNeighbour(Classifier):
    """1-nearest-neighbour on the raw inputs; no parameters."""

    @staticmethod
    def build(cfg: ModelConfig, params: object, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = make_likelihood(cfg)

        def logits(x_s: jax.Array, y_s: jax.Array, x_q: jax.Array) -> jax.Array:
            """-min_{i: y_i = k} ||x* - x_i||^2 for each class k (one task)."""
            d = jnp.sum(jnp.square(x_q[:, None] - x_s[None]), -1)
            same = jax.nn.one_hot(y_s, y_dim, dtype=bool)
            return -jnp.min(jnp.where(same[None], d[:, :, None], jnp.inf), axis=1)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            out = jax.vmap(logits)(batch.x_support, batch.y_support, batch.x_query)
            observe(lik, out, batch.y_query)

        return Method(name="nearest", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
