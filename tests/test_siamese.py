"""Siamese networks: the pair labels and weights an episode gives, the verification loss by hand, one-shot
accuracy by the nearest match on embeddings built so that the answer is known, and a short fit on
hidden clusters that must learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO

from bayesmeta import registry
from bayesmeta.models.siamese import nearest_match_logits, pair_labels, pair_logits, pair_weights
from bayesmeta.registry import build_method
from bayesmeta.tasks import TaskBatch
from tests.clusters import fit_accuracy


def test_pair_labels_and_weights_of_an_episode():
    """A 3-way 2-shot support set against 4 queries: same = 1 exactly where the labels agree; balanced
    weights put half the mass on the 8 same pairs and half on the 16 different ones, "all" is uniform."""
    y_s = jnp.array([0, 0, 1, 1, 2, 2])
    y_q = jnp.array([2, 0, 1, 1])
    same = pair_labels(y_q, y_s)
    expect = [[0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    np.testing.assert_array_equal(same, expect)
    w = pair_weights(same, balanced=True)
    np.testing.assert_allclose(w, np.where(np.array(expect) == 1, 0.5 / 8, 0.5 / 16))
    np.testing.assert_allclose(pair_weights(same, balanced=False), np.full((4, 6), 1 / 24))


def test_pair_logits_and_nearest_match_by_hand():
    """logit = w . |a - b| + b; a class's logit is the best of its items' (max over the class)."""
    unit = {"w": jnp.array([[-1.0], [-2.0]]), "b": jnp.array([0.5])}
    a = jnp.array([[0.0, 0.0]])
    b = jnp.array([[1.0, 1.0], [0.0, 3.0], [2.0, 0.0]])
    logit = pair_logits(unit, a, b)
    np.testing.assert_allclose(logit, [[0.5 - 1 - 2, 0.5 - 6, 0.5 - 2]])
    np.testing.assert_allclose(nearest_match_logits(logit, jnp.array([1, 0, 1]), 2), [[-5.5, -1.5]])


def identity_siamese():
    """A siamese net on 3-d inputs whose embedding is the identity on x >= 0 (one ReLU layer with W = I,
    b = 0) and whose unit is logit = -|f(x1) - f(x2)|_1 + 2: p(same) falls with the L1 distance."""
    cfg = registry.load_config(
        None, ["model.method='siamese'", "model.likelihood='categorical'", "model.net.hidden=[3]"]
    )
    method = build_method(cfg.model, 3, 3)
    params = {
        "theta.layer_0.w": jnp.eye(3),
        "theta.layer_0.b": jnp.zeros(3),
        "theta.head.w": -jnp.ones((3, 1)),
        "theta.head.b": jnp.array([2.0]),
    }
    return method, params


def hand_batch() -> TaskBatch:
    """One 3-way one-shot task: supports at e0, e1, e2 (scaled by 4); queries near support 0, 1, 2, 2 but
    the last is labelled 0, so the nearest match is right on 3 of 4."""
    x_s = 4.0 * jnp.eye(3)[None]
    x_q = jnp.array([[[3.5, 0.5, 0.0], [0.0, 4.2, 0.3], [0.1, 0.0, 3.0], [1.0, 0.0, 3.5]]])
    return TaskBatch(x_s, jnp.array([[0, 1, 2]]), x_q, jnp.array([[0, 1, 2, 0]]), {})


def test_one_shot_accuracy_by_the_nearest_match_on_known_embeddings():
    """With the identity embedding the predicted class is the support item nearest in L1; accuracy 3/4
    by construction, and the class probabilities are the softmax of the log-odds 2 - L1 distance."""
    method, params = identity_siamese()
    batch = hand_batch()
    f = Predictive(method.model, params=params, num_samples=1, return_sites=["f"])(
        jax.random.PRNGKey(0), batch._replace(y_query=None)
    )["f"][0, 0]
    np.testing.assert_array_equal(np.argmax(f, -1), [0, 1, 2, 2])
    assert float(np.mean(np.argmax(f, -1) == np.asarray(batch.y_query[0]))) == 0.75
    l1 = np.abs(np.asarray(batch.x_query[0])[:, None] - np.asarray(batch.x_support[0])[None]).sum(-1)
    np.testing.assert_allclose(f, jax.nn.softmax(2.0 - l1, -1), rtol=1e-5)


def test_training_observes_the_pairs_with_the_balanced_cross_entropy():
    """In training the model observes the pair labels (site "pairs") and not the query labels; its
    loss is the balanced binary cross-entropy of p(same) = sigmoid(2 - L1) over the 12 pairs."""
    method, params = identity_siamese()
    batch = hand_batch()
    tr = handlers.trace(handlers.substitute(method.model, params)).get_trace(batch)
    assert "y" not in tr and "pairs" in tr
    same = np.asarray(pair_labels(batch.y_query[0], batch.y_support[0]))
    np.testing.assert_array_equal(tr["pairs"]["value"][0], same)
    l1 = np.abs(np.asarray(batch.x_query[0])[:, None] - np.asarray(batch.x_support[0])[None]).sum(-1)
    p = 1 / (1 + np.exp(-(2.0 - l1)))
    bce = -(same * np.log(p) + (1 - same) * np.log(1 - p))
    expect = 0.5 * bce[same == 1].mean() + 0.5 * bce[same == 0].mean()
    elbo = Trace_ELBO().loss(jax.random.PRNGKey(0), params, method.model, method.guide, batch)
    np.testing.assert_allclose(elbo, expect, rtol=1e-5)


def test_siamese_network_learns_hidden_clusters():
    """300 steps of verification on the pairs of 5-way 1-shot episodes (clusters hidden among 10 noisy
    dimensions): held-out one-shot accuracy by the nearest match rises from near chance (0.2) by 0.25."""
    before, after, _ = fit_accuracy("model.method='siamese'", "model.net.hidden=[32]")
    assert before < 0.3 and after > before + 0.25, (before, after)
