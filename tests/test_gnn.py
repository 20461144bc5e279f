"""The few-shot GNN: edge kernels are a softmax over the other nodes, a graph layer by hand, the query's
scores do not depend on the order of the support items, and a short fit on hidden clusters learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.models.gnn import adjacency, edge_init, gnn_init, gnn_logits, graph_conv, query_graph
from tests.clusters import fit_accuracy
from tests.helpers import random_params

TINY = (
    "model.method='gnn'",
    "model.params.width=8",
    "model.params.layers=1",
    "model.params.edge_hidden=[1.0]",
)


def test_adjacency_is_a_softmax_over_the_other_nodes_and_a_layer_applies_i_and_a():
    """Rows of A sum to 1 with a zero diagonal; with a one-layer edge MLP w, b: A_ij = softmax_{j != i}
    (w . |x_i - x_j| + b); [x, A x] W + b by hand."""
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    mlp = {"0": {"w": jnp.array([[1.0], [-2.0], [0.5]]), "b": jnp.array([0.3])}}
    a = np.asarray(adjacency(mlp, x))
    e = np.abs(np.asarray(x)[:, None] - np.asarray(x)[None]) @ np.array([1.0, -2.0, 0.5]) + 0.3
    np.fill_diagonal(e, -np.inf)
    expect = np.exp(e - e.max(1, keepdims=True))
    np.testing.assert_allclose(a, expect / expect.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.diag(a), 0.0)
    layer = {"w": jax.random.normal(jax.random.PRNGKey(1), (6, 2)), "b": jnp.array([1.0, -1.0])}
    want = np.concatenate([np.asarray(x), a @ np.asarray(x)], -1) @ np.asarray(layer["w"]) + [1.0, -1.0]
    np.testing.assert_allclose(graph_conv(layer, jnp.asarray(a), x), want, rtol=1e-5, atol=1e-5)
    assert len(edge_init(jax.random.PRNGKey(0), 4, (2.0, 1.0))) == 3


def test_query_scores_do_not_depend_on_the_order_of_the_support_items():
    """Permuting the support nodes (embeddings with their labels) leaves the query node's scores
    unchanged, for several random permutations and two graph layers; the query node carries 1/N."""
    ways, d = 4, 5
    p = random_params(lambda: gnn_init(jax.random.PRNGKey(0), d + ways, 2, 6, (2.0, 1.5, 1.0, 1.0), ways))
    z_s = jax.random.normal(jax.random.PRNGKey(1), (8, d))
    y_s = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
    z_q = jax.random.normal(jax.random.PRNGKey(2), (d,))
    nodes = query_graph(z_s, y_s, z_q, ways)
    np.testing.assert_allclose(nodes[0, d:], 1.0 / ways)
    score = jax.jit(lambda zs, ys: gnn_logits(p, query_graph(zs, ys, z_q, ways), 2)[0])
    base = np.asarray(score(z_s, y_s))
    for i in range(4):
        perm = jax.random.permutation(jax.random.PRNGKey(10 + i), 8)
        np.testing.assert_allclose(score(z_s[perm], y_s[perm]), base, rtol=1e-5, atol=1e-5)
    # relabelling the support items does change the scores (the labels are read)
    assert not np.allclose(score(z_s, (y_s + 1) % ways), base, atol=1e-4)


def test_gnn_learns_hidden_clusters():
    """400 steps (lr 1e-2) on 5-way 1-shot clusters hidden among noisy dimensions: held-out accuracy rises
    from near chance (0.2) by at least 0.3."""
    before, after, _ = fit_accuracy(*TINY, "train.lr=1e-2", steps=400)
    assert before < 0.3 and after > before + 0.3, (before, after)
