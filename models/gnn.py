"""Few-shot learning with graph neural networks (Garcia & Bruna 2018; METHODS 9) as a NumPyro model.
Survey 002, lines 904-1000:

    x_i^(0) = [phi(x_i), h(l_i)]          a node per support item: its embedding and its label's one-hot;
                                           the query node carries the uniform distribution 1/N instead
    A^(k)_ij = softmax_{j != i}(MLP^(k)(|x_i^(k) - x_j^(k)|))      a learned edge kernel per layer
    x^(k+1) = [x^(k), leaky_relu([x^(k), A^(k) x^(k)] W^(k) + b^(k))]   graph convolution with the
                                           operators {I, A^(k)}, new features appended (dense connections)
    p(y* = k | T) = softmax_k(([x^(L), A^(L) x^(L)] W^(L) + b^(L))_{query node})   read out at the last layer

phi is the configured net's features (conv4 with max pooling: the paper's Omniglot embedding, 64
features). The reference implementation's Omniglot network has `layers` = 2 graph convolutions of 48
new features each (`width`, nf / 2 with nf = 96) and edge MLPs of widths (2, 1.5, 1, 1) x the node
features (`edge_hidden`), leaky ReLU between them; batch norm in the graph layers is left out here.
Self-edges are excluded from the softmax (the operator I carries the node itself).

Each query is its own graph with every support node (the paper's few-shot setting: one unlabelled node,
t = 1), so queries never see one another. Every operation is the same for each support node and sums
over them, so the query's scores do not depend on the support items' order (tested). The likelihood is
over the query labels; no inner loop: `inner_steps` is accepted and ignored.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, no_guide
from bayesmeta.models.baselines import Classifier
from bayesmeta.nets import dense, dense_init, embedding, make_net, task_vmap
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def edge_init(key: jax.Array, c: int, ratios: tuple[float, ...]) -> dict:
    """An MLP c -> ratios[0] c -> ... -> 1 (at least 1 unit per layer), layers "0", "1", ... in order."""
    sizes = [c, *(max(1, round(r * c)) for r in ratios), 1]
    keys = jax.random.split(key, len(sizes) - 1)
    return {str(i): dense_init(keys[i], a, b) for i, (a, b) in enumerate(itertools.pairwise(sizes))}


def adjacency(mlp: dict, x: jax.Array) -> jax.Array:
    """A_ij = softmax_{j != i}(MLP(|x_i - x_j|)) for node features x (V, c): (V, V), zero diagonal."""
    h = jnp.abs(x[:, None, :] - x[None, :, :])
    for i in range(len(mlp) - 1):
        h = jax.nn.leaky_relu(dense(mlp[str(i)], h))
    e = dense(mlp[str(len(mlp) - 1)], h)[..., 0]
    return jax.nn.softmax(jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, e), axis=-1)


def graph_conv(layer: dict, a: jax.Array, x: jax.Array) -> jax.Array:
    """[x, A x] W + b: the operators {I, A} applied to the node features x (V, c)."""
    return dense(layer, jnp.concatenate([x, a @ x], -1))


def gnn_init(key: jax.Array, c: int, layers: int, width: int, ratios: tuple[float, ...], ways: int) -> dict:
    """Edge MLPs and graph convolutions for `layers` hidden layers (each appends `width` features) and
    the read-out layer, on nodes of c input features."""
    params = {}
    for k in range(layers + 1):
        key, ke, kl = jax.random.split(key, 3)
        out = width if k < layers else ways
        params[f"layer_{k}"] = {"edge": edge_init(ke, c, ratios), "conv": dense_init(kl, 2 * c, out)}
        c += width
    return params


def gnn_logits(p: dict, nodes: jax.Array, layers: int) -> jax.Array:
    """Scores of every node (V, ways) after `layers` dense graph layers and the read-out layer."""
    x = nodes
    for k in range(layers):
        layer = p[f"layer_{k}"]
        x = jnp.concatenate(
            [x, jax.nn.leaky_relu(graph_conv(layer["conv"], adjacency(layer["edge"], x), x))], -1
        )
    last = p[f"layer_{layers}"]
    return graph_conv(last["conv"], adjacency(last["edge"], x), x)


def query_graph(z_s: jax.Array, y_s: jax.Array, z_q: jax.Array, ways: int) -> jax.Array:
    """The nodes of one query's graph (n_s + 1, d + ways): the query (uniform label), then the support."""
    query = jnp.concatenate([z_q, jnp.full((ways,), 1.0 / ways)])
    support = jnp.concatenate([z_s, jax.nn.one_hot(y_s, ways)], -1)
    return jnp.concatenate([query[None], support])


class GNN(Classifier):
    """Support and query nodes with label encodings, learned edge kernels, dense graph convolutions."""

    @dataclass(frozen=True)
    class Params:
        layers: int = opt(2, ge=0, doc="graph convolution layers before the read-out (the paper: 2)")
        width: int = opt(48, ge=1, doc="features each graph layer appends (the reference: nf / 2 = 48)")
        edge_hidden: tuple[float, ...] = opt(
            (2.0, 1.5, 1.0, 1.0), gt=0, doc="edge-MLP hidden widths as multiples of the node features"
        )

    @staticmethod
    def build(cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        p = params
        body, d = embedding(net, x_dim)

        def init(key: jax.Array) -> dict:
            kb, kg = jax.random.split(key)
            return {
                "embed": body(kb),
                "gnn": gnn_init(kg, d + y_dim, p.layers, p.width, p.edge_hidden, y_dim),
            }

        def task_logits(theta: dict, x_s: jax.Array, y_s: jax.Array, x_q: jax.Array) -> jax.Array:
            """One task's query scores (n_q, ways), each query in its own graph with the support nodes."""
            z_s, z_q = net.features(theta["embed"], x_s), net.features(theta["embed"], x_q)
            graphs = jax.vmap(lambda zq: query_graph(z_s, y_s, zq, y_dim))(z_q)
            return jax.vmap(lambda g: gnn_logits(theta["gnn"], g, p.layers)[0])(graphs)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            out = task_vmap(net, task_logits, theta, batch.x_support, batch.y_support, batch.x_query)
            observe(lik, out, batch.y_query)

        return Method(name="gnn", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
