"""TADAM: FiLM's identity leaves the conv and MLP features unchanged, TADAM with alpha = 1 and no task
conditioning is ProtoNet exactly (and alpha scales its logits), the TEN's FiLM pairs and L2 penalty by
hand, and a short fit on hidden clusters that must learn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry
from bayesmeta.models.tadam import film_penalty, task_representation, ten, ten_init
from bayesmeta.nets import MLP, Conv4, dense
from bayesmeta.registry import build_method, make_family
from bayesmeta.sites import tree_from_params
from tests.clusters import BASE, fit_accuracy


def test_film_identity_leaves_the_features_unchanged():
    """gamma = 1, beta = 0 on every block of a conv net and every hidden layer of an MLP is the identity;
    another FiLM pair on an MLP is act(gamma (W x + b) + beta) by hand."""
    conv = Conv4(in_dim=36, out_dim=3, filters=4, blocks=2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 36))
    p = conv.init(jax.random.PRNGKey(0))
    ident = tuple((jnp.ones(w), jnp.zeros(w)) for w in conv.film_widths)
    double = ((2 * ident[0][0], ident[0][1]), *ident[1:])
    features = jax.jit(conv.features)  # one compilation: eager convolutions dispatch op by op
    np.testing.assert_array_equal(features(p, x, ident), features(p, x))
    assert not np.allclose(features(p, x, double), features(p, x))
    mlp = MLP(in_dim=5, out_dim=2, hidden=(4, 3), activation="tanh")
    q = mlp.init(jax.random.PRNGKey(2))
    v = jax.random.normal(jax.random.PRNGKey(3), (7, 5))
    ident = tuple((jnp.ones(w), jnp.zeros(w)) for w in mlp.film_widths)
    np.testing.assert_array_equal(mlp.features(q, v, ident), mlp.features(q, v))
    g, b = jnp.array([2.0, 0.5, -1.0, 1.0]), jnp.array([0.1, 0.0, 0.3, -0.2])
    by_hand = jnp.tanh(dense(q["layer_1"], jnp.tanh(g * dense(q["layer_0"], v) + b)))
    np.testing.assert_allclose(mlp.features(q, v, ((g, b), None)), by_hand, rtol=1e-6)


@functools.cache
def setup(*overrides: str) -> tuple:
    """(method, 8 one-shot 5-way tasks, initial params, jitted params -> training trace's logits and
    film_l2 factor) for BASE + overrides; 8 tasks, as fit_accuracy initialises with (XLA's cache then
    shares the compiled initialisation)."""
    cfg = registry.load_config(None, [*BASE, *overrides])
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    batch = fam.sample(jax.random.PRNGKey(1), 8)
    svi = SVI(method.model, method.guide, optax.sgd(0.0), Trace_ELBO())
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))

    @jax.jit
    def trace(p: dict) -> dict:
        tr = handlers.trace(handlers.substitute(method.model, p)).get_trace(batch)
        factor = tr["film_l2"]["fn"].log_prob(0.0) if "film_l2" in tr else jnp.nan
        return {"logits": tr["y"]["fn"].logits, "film_l2": factor}

    return method, batch, params, trace


def test_tadam_without_conditioning_at_alpha_one_is_protonet_and_alpha_scales_its_logits():
    """alpha = 1 fixed and film = false: TADAM's logits are ProtoNet's at the same theta, exactly. With
    FiLM on at its start (gamma0 = beta0 = 0) and a learned alpha = 2.5, they are 2.5 ProtoNet's."""
    *_, params, proto = setup("model.method='protonet'")
    _, _, _, plain = setup(
        "model.method='tadam'", "model.params.metric_scale=false", "model.params.film=false"
    )
    np.testing.assert_array_equal(plain(params)["logits"], proto(params)["logits"])
    _, _, full, tadam = setup("model.method='tadam'")
    assert float(full["alpha"]) == 1.0 and not np.any(full["ten.scale.gamma0"])
    at = {**full, **params, "alpha": jnp.asarray(2.5)}
    np.testing.assert_allclose(tadam(at)["logits"], 2.5 * proto(params)["logits"], rtol=1e-6)


def test_task_embedding_network_film_pairs_and_penalty_by_hand():
    """gamma_l = 1 + gamma0_l h_l(c_bar), beta_l = beta0_l b_l(c_bar) with c_bar the mean of the class
    prototypes; the training loss gains film_l2 * sum(gamma0^2 + beta0^2) (default film_l2 = 0.01); the
    conditioning changes the logits."""
    z = jnp.array([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0], [2.0, 2.0]])
    y = jnp.array([0, 0, 1, 2])
    np.testing.assert_allclose(task_representation(z, y, 3), [(1 + 4 + 2) / 3, (1 + 4 + 2) / 3])
    *_, params, tadam = setup("model.method='tadam'")
    tenp = tree_from_params("ten", lambda k: ten_init(k, 16, (16,)), params)
    nested = {**tenp, "scale": {"gamma0": jnp.array([0.7]), "beta0": jnp.array([-0.2])}}
    c = jnp.array([0.5] * 16)
    mlp = lambda q: dense(q["head"], jax.nn.relu(dense(q["layer_0"], c)))  # noqa: E731
    ((gamma, beta),) = ten(nested, c)
    np.testing.assert_allclose(gamma, 1 + 0.7 * mlp(nested["film_0"]["gamma"]), rtol=1e-6)
    np.testing.assert_allclose(beta, -0.2 * mlp(nested["film_0"]["beta"]), rtol=1e-6)
    assert float(film_penalty(nested)) == pytest.approx(0.7**2 + 0.2**2, rel=1e-6)
    moved = {**params, "ten.scale.gamma0": jnp.array([0.7]), "ten.scale.beta0": jnp.array([-0.2])}
    out, start = tadam(moved), tadam(params)
    np.testing.assert_allclose(out["film_l2"], -0.01 * (0.7**2 + 0.2**2), rtol=1e-6)  # film_l2 = 0.01
    assert float(start["film_l2"]) == 0.0
    assert not np.allclose(out["logits"], start["logits"], atol=1e-4)


def test_tadam_learns_hidden_clusters():
    """300 steps on 5-way 1-shot clusters hidden among 10 noisy dimensions: held-out accuracy rises from
    near chance (0.2) by at least 0.3."""
    before, after, _ = fit_accuracy("model.method='tadam'")
    assert before < 0.3 and after > before + 0.3, (before, after)
