"""MANN: least-recently-used access on a hand-computed case (usage weights, least-used weights, write
weights, the cleared slot, the cosine read), the presentation counts behind accuracy by instance, the
engine's episode_metrics section on a fitted model, and a short fit on hidden clusters that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesmeta.models.mann import (
    Memory,
    Sizes,
    instance_accuracy,
    instance_numbers,
    least_used,
    memory_step,
    strength_init,
    update_usage,
    write_weights,
)
from tests.clusters import fit_accuracy

TINY = (
    "model.method='mann'",
    "model.params.units=32",
    "model.params.slots=16",
    "model.params.width=8",
    "model.params.heads=2",
)


def test_least_recently_used_access_by_hand():
    """Two heads on four slots, gamma = 0.5, every number computed by hand below."""
    usage = jnp.array([0.5, 0.1, 0.9, 0.3])
    np.testing.assert_array_equal(least_used(usage, 2), [0, 1, 0, 1])  # the 2 smallest: 0.1, 0.3
    np.testing.assert_array_equal(least_used(usage, 1), [0, 1, 0, 0])
    read_prev = jnp.array([[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]])
    # sigmoid(0) = 0.5, sigmoid(log 3) = 0.75:  w^w = g w^r_{t-1} + (1 - g) w^lu_{t-1}
    w = write_weights(jnp.array([0.0, np.log(3.0)]), read_prev, jnp.array([0.0, 1, 0, 1]))
    np.testing.assert_allclose(w, [[0.5, 0.5, 0, 0.5], [0, 0.25, 0.375, 0.625]], rtol=1e-6)
    read = jnp.array([[0.25, 0.25, 0.25, 0.25], [0, 1.0, 0, 0]])
    # w^u = 0.5 [0.5, 0.1, 0.9, 0.3] + (w^r summed) [0.25, 1.25, 0.25, 0.25]
    #       + (w^w summed) [0.5, 0.75, 0.375, 1.125]
    np.testing.assert_allclose(
        update_usage(usage, read, w, 0.5), [1.0, 2.05, 1.075, 1.525], rtol=1e-6, atol=1e-7
    )

    # one full access: slot 1 is the least used before the write, so it is cleared, then both keys are
    # written by w^w and read back by cosine attention
    m = jnp.array([[1.0, 0], [2.0, 2.0], [0, 1.0], [1.0, 1.0]])
    mem = Memory(m, read_prev, usage, least_used(usage, 2))
    keys = jnp.array([[1.0, 0], [0, 2.0]])
    new, reads = memory_step(mem, keys, jnp.array([0.0, np.log(3.0)]), 0.5)
    w_np = np.asarray(w)
    m_want = np.array([[1.0, 0], [0, 0], [0, 1.0], [1.0, 1.0]]) + w_np.T @ np.asarray(keys)
    np.testing.assert_allclose(new.m, m_want, rtol=1e-6)
    unit = m_want / np.linalg.norm(m_want, axis=1, keepdims=True)
    cos = (np.asarray(keys) / np.linalg.norm(keys, axis=1, keepdims=True)) @ unit.T
    r = np.exp(cos) / np.exp(cos).sum(1, keepdims=True)
    np.testing.assert_allclose(new.read, r, rtol=1e-5)
    np.testing.assert_allclose(reads, r @ m_want, rtol=1e-5)
    u = 0.5 * np.asarray(usage) + r.sum(0) + w_np.sum(0)
    np.testing.assert_allclose(new.usage, u, rtol=1e-5)
    np.testing.assert_array_equal(new.least, (u <= np.sort(u)[1]).astype(float))


def test_presentation_numbers_and_accuracy_by_instance():
    """n_t counts the earlier items of y_t's class plus one; accuracy at instance n averages the steps
    with that count (NaN when there is none)."""
    y = jnp.array([2, 0, 2, 2, 1, 0])
    np.testing.assert_array_equal(instance_numbers(y, 3), [1, 1, 2, 3, 1, 2])
    logits = jax.nn.one_hot(jnp.array([0, 0, 2, 1, 1, 0]), 3)  # right at steps 1, 2, 4, 5
    acc = instance_accuracy(logits, y, 3, (1, 2, 3, 4))
    np.testing.assert_allclose(acc["accuracy_instance_1"], 2 / 3)
    np.testing.assert_allclose(acc["accuracy_instance_2"], 1.0)
    np.testing.assert_allclose(acc["accuracy_instance_3"], 0.0)
    assert np.isnan(acc["accuracy_instance_4"])


@pytest.mark.parametrize("options", [(), ("model.params.key_strength=true", "model.params.add_vector=true")])
def test_mann_learns_hidden_clusters(options):
    """800 steps (lr 1e-2) on 2-way 1-shot clusters (nuisance sd 0.3): held-out query accuracy rises from
    near chance (0.5) by at least 0.25; the support items are bound to their labels through the memory,
    with the paper's read and with the key strength and add vector."""
    before, after, _ = fit_accuracy(
        *TINY, *options, "train.lr=1e-2", "task.params.ways=2", "task.params.nuisance=0.3", steps=800
    )
    assert before < 0.6 and after > before + 0.25, (before, after)


def test_key_strength_and_add_vector_by_hand():
    """With key strengths beta the read is softmax(beta cos(k, M_t)); with an add vector the memory
    receives the values, not the keys, and the reads still compare the keys; the strength head starts
    at beta = strength."""
    usage = jnp.array([0.5, 0.1, 0.9, 0.3])
    read_prev = jnp.array([[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]])
    m = jnp.array([[1.0, 0], [2.0, 2.0], [0, 1.0], [1.0, 1.0]])
    mem = Memory(m, read_prev, usage, least_used(usage, 2))
    keys, values = jnp.array([[1.0, 0], [0, 2.0]]), jnp.array([[0.0, -1.0], [3.0, 1.0]])
    alpha, beta = jnp.array([0.0, np.log(3.0)]), jnp.array([2.0, 5.0])
    new, reads = memory_step(mem, keys, alpha, 0.5, beta, values)
    w = np.asarray(write_weights(alpha, read_prev, mem.least))
    m_want = np.array([[1.0, 0], [0, 0], [0, 1.0], [1.0, 1.0]]) + w.T @ np.asarray(values)
    np.testing.assert_allclose(new.m, m_want, rtol=1e-6)
    unit = m_want / np.linalg.norm(m_want, axis=1, keepdims=True)
    cos = (np.asarray(keys) / np.linalg.norm(keys, axis=1, keepdims=True)) @ unit.T
    r = np.exp(np.asarray(beta)[:, None] * cos)
    r /= r.sum(1, keepdims=True)
    np.testing.assert_allclose(new.read, r, rtol=1e-5)
    np.testing.assert_allclose(reads, r @ m_want, rtol=1e-5)

    head = strength_init(jax.random.PRNGKey(0), Sizes(8, 4, 2, 3, 5, key_strength=True, strength=10.0))
    np.testing.assert_allclose(1 + jax.nn.softplus(head["b"]), 10.0, rtol=1e-5)
