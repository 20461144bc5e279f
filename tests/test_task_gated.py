"""HSML and ARML (models/task_gated.py): gated initialisations that reduce to MAML, order-free task
representations, and the graph and clustering maths by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Predictive

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.fit import fit
from bayesmeta.models import task_gated as tg
from bayesmeta.registry import build_method, make_family
from tests.helpers import TINY, elbo

SMALL_REPR = ["model.params.hidden=6", "model.params.ae_hidden=5"]
HSML = ["model.method='hsml'", *SMALL_REPR, "model.params.clusters=[3, 2]"]
ARML = ["model.method='arml'", *SMALL_REPR, "model.params.vertices=4", "model.params.prototypes=2"]
METHODS = {"hsml": HSML, "arml": ARML}


def setup(*overrides: str, tasks: int = 3):
    """(method, a batch of 6-shot sinusoid tasks, params) for tests.helpers.TINY + overrides: every param
    site of the model (found by jax.eval_shape, nothing compiled) drawn N(0, 0.5^2) by numpy."""
    cfg = registry.load_config(None, [*TINY, "task.shots=6", *overrides])
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    batch = fam.sample(jax.random.PRNGKey(4), tasks)

    def sites(b):
        trace = handlers.trace(handlers.seed(method.model, 3)).get_trace(b, inner_steps=0)
        return {k: v["value"] for k, v in trace.items() if v["type"] == "param"}

    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(sites, batch)
    return (
        method,
        batch,
        {k: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32) for k, s in sorted(shapes.items())},
    )


@pytest.fixture(scope="module")
def built():
    """The tiny HSML and ARML problems (the same tasks), built once for the module."""
    return {name: setup(*over) for name, over in METHODS.items()}


def sub_tree(params: dict, prefix: str) -> dict:
    """The nested dict of the sites under `prefix.` (as param_tree registered them)."""
    out: dict = {}
    for k, v in params.items():
        if k.startswith(prefix + "."):
            *path, leaf = k[len(prefix) + 1 :].split(".")
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(v)
    return out


@pytest.fixture(scope="module")
def maml(built):
    """MAML on the tiny problem at HSML's theta: its params, loss and gradient."""
    cfg = registry.load_config(None, [*TINY, "task.shots=6", "model.method='maml'"])
    method = build_method(cfg.model, 1, 1)
    _, batch, hsml = built["hsml"]
    params = {k: v for k, v in hsml.items() if k.startswith("theta.")}
    loss, grad = jax.jit(jax.value_and_grad(lambda p: elbo(method, p, batch)))(params)
    return batch, params, float(loss), grad


def gates_of_one(params: dict, p_maml: dict, gate: str) -> dict:
    """params with MAML's theta and every gate at W_g = 0, b_g = 50 (sigmoid(50) = 1 in float32)."""

    def opened(k: str, v: jax.Array) -> jax.Array:
        return jnp.zeros_like(v) if k.endswith(".w") else jnp.full_like(v, 50.0)

    return {
        k: p_maml[k] if k.startswith("theta.") else opened(k, v) if k.startswith(gate) else v
        for k, v in params.items()
    }


@pytest.mark.parametrize("name", ["hsml", "arml"])
def test_gates_of_one_are_maml(maml, built, name):
    """W_g = 0, b_g = 50: sigmoid(50) = 1 in float32, so theta_0i = theta for every task, and with no
    reconstruction term the loss and its gradient in theta are MAML's (the gradient would be MAML's
    whatever the term's weight: it does not depend on theta)."""
    batch, p_maml, loss_maml, grad_maml = maml
    _, batch2, params = built[name]
    assert np.array_equal(batch2.x_support, batch.x_support)
    cfg = registry.load_config(None, [*TINY, "task.shots=6", *METHODS[name], "model.params.recon_weight=0"])
    method = build_method(cfg.model, 1, 1)
    gate = f"{name}.gate."
    assert float(jax.nn.sigmoid(jnp.float32(50.0))) == 1.0
    params = gates_of_one(params, p_maml, gate)
    value_and_grad = jax.jit(jax.value_and_grad(lambda p: elbo(method, p, batch)))
    loss, grad = value_and_grad(params)
    np.testing.assert_allclose(float(loss), loss_maml, rtol=1e-6)
    for k, g in grad_maml.items():
        np.testing.assert_allclose(grad[k], g, rtol=1e-5, atol=1e-7, err_msg=k)
    # and a gate of 1/2 is not MAML: the test can tell
    half = {k: (jnp.zeros_like(v) if k.startswith(gate) else v) for k, v in params.items()}
    assert abs(float(value_and_grad(half)[0]) - loss_maml) > 1e-3


def test_soft_assignment_by_hand():
    """h at c_1, c_2 at squared distance 4, sigma^2 = 2: p = (1, e^-1) / (1 + e^-1)."""
    h = jnp.array([[1.0, 0.0]])
    c = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(
        tg.soft_assign(h, c, 2.0)[0], np.array([1.0, np.exp(-1)]) / (1 + np.exp(-1)), 1e-6
    )


def test_one_level_tree_by_hand():
    """With one cluster per level the assignments are 1: h1 = tanh(W1 g + b1), root = tanh(W_r h1 + b_r)."""
    tree = tg.materialize(jax.random.PRNGKey(0), tg.cluster_tree_spec((1,), 3))
    tree["level_00"]["b"] = jnp.array([[0.1, -0.2, 0.3]])
    g = jnp.array([0.5, -1.0, 2.0])
    root, assigns = tg.hierarchical_cluster(tree, g, 2.0)
    h1 = np.tanh(np.asarray(g) @ np.asarray(tree["level_00"]["w"][0]) + np.array([0.1, -0.2, 0.3]))
    expect = np.tanh(h1 @ np.asarray(tree["root"]["w"]) + np.asarray(tree["root"]["b"]))
    np.testing.assert_allclose(root, expect, rtol=1e-5, atol=1e-6)
    assert [np.asarray(a).tolist() for a in assigns] == [[[1.0]]]


def test_gate_theta_by_hand():
    """theta_0 = sigmoid(z W + b) o theta entry by entry; "tensor": one gate per tensor in tree order."""
    theta = {"head": {"b": jnp.array([0.5]), "w": jnp.array([[1.0], [-2.0]])}}
    z = jnp.array([1.0, -1.0, 0.5])
    gate = tg.materialize(jax.random.PRNGKey(1), tg.gate_spec(3, theta, "entry"))
    out = tg.gate_theta(gate, z, theta, "entry")
    a = gate["head"]["w"]
    expect = (
        1 / (1 + np.exp(-(np.asarray(z) @ np.asarray(a["w"]) + np.asarray(a["b"])))) * np.array([1.0, -2.0])
    )
    np.testing.assert_allclose(out["head"]["w"][:, 0], expect, rtol=1e-6)
    tensor = tg.materialize(jax.random.PRNGKey(1), tg.gate_spec(3, theta, "tensor"))
    g = 1 / (1 + np.exp(-(np.asarray(z) @ np.asarray(tensor["w"]) + np.asarray(tensor["b"]))))
    out = tg.gate_theta(tensor, z, theta, "tensor")
    np.testing.assert_allclose(out["head"]["b"], g[0] * 0.5, rtol=1e-6)  # tree order: head.b, head.w
    np.testing.assert_allclose(out["head"]["w"], g[1] * np.array([[1.0], [-2.0]]), rtol=1e-6)


def permuted(batch, seed=0):
    """The support sets in a random order (the same permutation for every task)."""
    idx = np.random.default_rng(seed).permutation(batch.x_support.shape[1])
    return batch.x_support[:, idx], batch.y_support[:, idx]


def test_hsml_assignments_sum_to_one_and_ignore_the_support_order(built):
    _, batch, params = built["hsml"]
    ae, tree = sub_tree(params, "hsml.autoencoder"), sub_tree(params, "hsml.clusters")
    # centres spread out so that the assignments are far from uniform (a test that can fail)
    shape = tree["level_00"]["centres"].shape
    tree["level_00"]["centres"] = 3.0 * jax.random.normal(jax.random.PRNGKey(5), shape)

    @jax.jit
    def clusters(x, y):  # every task
        def one(xi, yi):
            g, _ = tg.pooled_autoencoder(ae, tg.pair_features(xi, yi))
            return tg.hierarchical_cluster(tree, g, 2.0)

        return jax.vmap(one)(x, y)

    root, assigns = clusters(batch.x_support, batch.y_support)
    assert [a.shape for a in assigns] == [(3, 1, 3), (3, 3, 2)]
    for a in assigns:
        np.testing.assert_allclose(jnp.sum(a, -1), 1.0, rtol=1e-6)
    root_p, assigns_p = clusters(*permuted(batch))
    np.testing.assert_allclose(root_p, root, rtol=1e-5, atol=1e-6)
    for a, b in zip(assigns, assigns_p, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    first = np.asarray(assigns[0][:, 0])
    assert first.max() > 0.5 and first.std(0).max() > 1e-3  # not uniform, and task-dependent


def test_arml_graph_and_propagation_ignore_the_support_order(built):
    _, batch, params = built["arml"]
    nets = sub_tree(params, "arml")

    @jax.jit
    def propagate(x, y):  # every task
        a_g = tg.relation_graph(nets["vertex_rel"], nets["vertices"])

        def one(xi, yi):
            c = tg.prototypes(nets["embed"], nets["assign"], tg.pair_features(xi, yi))
            a, h, a_s = tg.super_graph(c, tg.relation_graph(nets["proto_rel"], c), nets["vertices"], a_g, 2.0)
            return a, a_s, tg.gcn([nets["gcn"]["layer_00"]], a, h)[:2]

        return jax.vmap(one)(x, y)

    a, a_s, c_hat = propagate(batch.x_support, batch.y_support)
    assert a.shape == (3, 6, 6) and c_hat.shape == (3, 2, 6)
    np.testing.assert_allclose(a, np.swapaxes(a, 1, 2), rtol=1e-6)  # A_R, A_G symmetric; A_S beside A_S^T
    np.testing.assert_array_equal(np.diagonal(a, axis1=1, axis2=2), 0.0)
    np.testing.assert_allclose(jnp.sum(a_s, -1), 1.0, rtol=1e-6)
    a_p, _, c_hat_p = propagate(*permuted(batch))
    np.testing.assert_allclose(a_p, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_hat_p, c_hat, rtol=1e-5, atol=1e-6)
    assert np.std(np.asarray(c_hat), 0).max() > 1e-4  # the tasks differ


def test_arml_q_pools_the_prototypes_or_the_points(built):
    """q_i (z's second half) pools the prototypes (the paper's eq. 8) or, with q_from = "points", the
    support points' embeddings e_j (the reference's regression code), by hand; t_i is the same either
    way, and both ignore the support order."""
    _, batch, params = built["arml"]
    nets = sub_tree(params, "arml")
    embed, enc = jax.tree.map(np.asarray, (nets["embed"], nets["ae_q"]["encoder"]))

    def z(x, y, q_from):
        return np.asarray(tg.arml_representation(nets, x, y, 2, 2.0, 1, q_from)[0])

    x, y = batch.x_support[0], batch.y_support[0]
    points, protos = z(x, y, "points"), z(x, y, "prototypes")
    d = points.shape[0] // 2
    np.testing.assert_allclose(points[:d], protos[:d], rtol=1e-6)
    e = np.concatenate([x, y], -1) @ embed["w"] + embed["b"]
    hidden = np.maximum(e @ enc["layer_0"]["w"] + enc["layer_0"]["b"], 0)
    h = np.maximum(hidden @ enc["head"]["w"] + enc["head"]["b"], 0)  # the encoder ends in a ReLU
    np.testing.assert_allclose(points[d:], h.mean(0), rtol=1e-5, atol=1e-6)
    assert np.abs(points[d:] - protos[d:]).max() > 1e-3
    xp, yp = permuted(batch)
    np.testing.assert_allclose(z(xp[0], yp[0], "points"), points, rtol=1e-5, atol=1e-6)


def test_gcn_layer_by_hand():
    """Two nodes, one edge of weight 0.5: D^-1 (A + I) = [[2/3, 1/3], [1/3, 2/3]]."""
    layer = {"w": jnp.array([[2.0]]), "b": jnp.array([0.1])}
    out = tg.gcn([layer], jnp.array([[0.0, 0.5], [0.5, 0.0]]), jnp.array([[1.0], [-1.0]]))
    mixed = np.array([[2 / 3 - 1 / 3], [1 / 3 - 2 / 3]])
    np.testing.assert_allclose(out, np.tanh(2.0 * mixed + 0.1), rtol=1e-6)


@pytest.mark.parametrize(("layers", "reaches"), [(1, False), (2, True)])
def test_meta_graph_edges_reach_the_prototypes_after_two_layers(built, layers, reaches):
    """With one GCN layer (the reference) the prototype rows of H^(1) read A_R and A_S only, so the
    vertex-vertex edges A_G get no gradient; a second layer propagates them. The vertices reach C_hat
    through A_S and H either way."""
    _, batch, _ = built["arml"]
    nets = tg.materialize(jax.random.PRNGKey(2), tg.arml_spec(2, 6, 2, 4, 5, layers))

    def c_hat_sum(vertex_rel, vertices):
        c = tg.prototypes(
            nets["embed"], nets["assign"], tg.pair_features(batch.x_support[0], batch.y_support[0])
        )
        a_g = tg.relation_graph(vertex_rel, vertices)
        a, h, _ = tg.super_graph(c, tg.relation_graph(nets["proto_rel"], c), vertices, a_g, 2.0)
        return jnp.sum(tg.gcn([nets["gcn"][n] for n in tg.gcn_names(layers)], a, h)[:2])

    g_rel, g_vert = jax.jit(jax.grad(c_hat_sum, argnums=(0, 1)))(nets["vertex_rel"], nets["vertices"])
    assert (max(float(jnp.max(jnp.abs(v))) for v in g_rel.values()) > 1e-7) == reaches
    assert float(jnp.max(jnp.abs(g_vert))) > 1e-7


def test_predictions_ignore_the_support_order(built):
    """The whole model (representation, gate, inner loop) on a permuted support set: same predictions."""
    for method, batch, params in built.values():
        x, y = permuted(batch)
        pred = Predictive(method.model, params=params, num_samples=1)
        run = jax.jit(lambda b, pred=pred: pred(jax.random.PRNGKey(0), b._replace(y_query=None))["f"])
        np.testing.assert_allclose(
            run(batch._replace(x_support=x, y_support=y)), run(batch), rtol=1e-4, atol=1e-5
        )


def test_config_checks():
    with pytest.raises(ConfigError, match=r"model\.likelihood: method 'arml' supports 'gaussian'"):
        setup("model.method='arml'", "model.likelihood='categorical'")
    with pytest.raises(ConfigError, match="clusters"):
        setup("model.method='hsml'", "model.params.clusters=[]")


@pytest.mark.parametrize("name", ["hsml", "arml"])
def test_a_tiny_fit_on_the_sinusoid_lowers_the_loss(small_cfg, name):
    """200 steps on the sinusoid: the training loss's last 50 steps at most 0.85 x its first 50."""
    cfg = small_cfg(*METHODS[name], "model.inner_steps=1", "train.lr=5e-3", "train.meta_batch=16")
    fam = make_family(cfg.task)
    result = fit(build_method(cfg.model, fam.x_dim, fam.y_dim), fam, cfg.train, seed=0, progress=False)
    loss = np.asarray(result.trace.loss)
    assert np.all(np.isfinite(loss)) and loss[-50:].mean() < 0.85 * loss[:50].mean()


def test_gru_cell_by_hand():
    """One step of TF1's GRUCell with x = 0.5, h = -0.3 and given weights, written out in scalars."""
    p = {
        "gates": {"w": jnp.array([[0.2, -0.1], [0.4, 0.3]]), "b": jnp.array([1.0, 1.0])},
        "candidate": {"w": jnp.array([[0.7], [-0.6]]), "b": jnp.array([0.05])},
    }
    x, h = 0.5, -0.3
    sig = lambda a: 1.0 / (1.0 + math.exp(-a))  # noqa: E731
    r = sig(x * 0.2 + h * 0.4 + 1.0)
    u = sig(x * -0.1 + h * 0.3 + 1.0)
    c = math.tanh(x * 0.7 + (r * h) * -0.6 + 0.05)
    out = tg.gru_cell(p, jnp.array([x]), jnp.array([h]))
    np.testing.assert_allclose(out, [u * h + (1 - u) * c], rtol=1e-6)


def test_gru_autoencoder_against_a_loop():
    """The scanned autoencoder against a plain loop over the references' steps: the encoder from
    zeros, the embedding the mean of its states, the decoder from the last state and input zeros
    feeding its reconstructions back, the loss against the sequence reversed."""
    ae = tg.materialize(jax.random.PRNGKey(0), tg.gru_autoencoder_spec(3, 4))
    v = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    h, states = jnp.zeros(4), []
    for t in range(5):
        h = tg.gru_cell(ae["encoder"], v[t], h)
        states.append(h)
    x, out = jnp.zeros(3), []
    for _ in range(5):
        h = tg.gru_cell(ae["decoder"], x, h)
        x = h @ ae["out"]["w"] + ae["out"]["b"]
        out.append(x)
    want_loss = np.mean([(np.asarray(v[t]) - np.asarray(out[4 - t])) ** 2 for t in range(5)])
    z, loss = tg.gru_autoencoder(ae, v)
    np.testing.assert_allclose(z, np.mean(states, 0), rtol=1e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(ae["encoder"]["gates"]["b"], 1.0)  # TF1's gate bias
    np.testing.assert_allclose(ae["out"]["b"], 0.1)


@pytest.mark.parametrize("name", ["hsml", "arml"])
def test_the_gru_aggregator_sees_the_support_order_and_gates_of_one_are_maml(maml, name):
    """aggregator = 'gru' (ARML with q over the points, as the reference): a permuted support set
    changes the task representation, hence the prediction; with gates of one it is MAML still."""
    batch, p_maml, loss_maml, _ = maml
    gru = ["model.params.aggregator='gru'", *(["model.params.q_from='points'"] if name == "arml" else [])]
    method, batch2, params = setup(*METHODS[name], *gru, "model.params.recon_weight=0")
    assert np.array_equal(batch2.x_support, batch.x_support)
    pred = Predictive(method.model, params=params, num_samples=1)
    run = jax.jit(lambda b: pred(jax.random.PRNGKey(0), b._replace(y_query=None))["f"])
    x, y = permuted(batch)
    assert float(jnp.max(jnp.abs(run(batch._replace(x_support=x, y_support=y)) - run(batch)))) > 1e-4
    loss = float(jax.jit(lambda p: elbo(method, p, batch))(gates_of_one(params, p_maml, f"{name}.gate.")))
    np.testing.assert_allclose(loss, loss_maml, rtol=1e-6)
