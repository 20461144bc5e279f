"""Meta-PCGrad (METHODS 7.3) and the per-task gradient path of the SVI step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bayesmeta import run
from bayesmeta.fit import NonFiniteError, fit, initial_state, make_svi, task_gradients
from bayesmeta.pcgrad import pcgrad, project_conflicting, task_mean

KEY = jax.random.PRNGKey(0)


def test_conflicting_pair_is_projected_to_non_negative_inner_product():
    g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]]), "b": jnp.array([[0.5], [0.2]])}
    flat = np.concatenate([np.asarray(g["b"]), np.asarray(g["w"])], 1)  # ravel order: b, w
    assert flat[0] @ flat[1] < 0
    out = project_conflicting(g, KEY)
    new = np.concatenate([np.asarray(out["b"]), np.asarray(out["w"])], 1)
    assert new[0] @ new[1] >= 0
    # with two tasks each projection lands on the normal plane of the other's original gradient
    np.testing.assert_allclose([new[0] @ flat[1], new[1] @ flat[0]], 0.0, atol=1e-6)
    expected0 = flat[0] - (flat[0] @ flat[1]) / (flat[1] @ flat[1]) * flat[1]
    np.testing.assert_allclose(new[0], expected0, rtol=1e-6)


def test_non_conflicting_gradients_are_unchanged_and_combine_as_the_mean():
    g = {"w": jnp.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [2.0, 1.0, 3.0]])}
    for k in jax.random.split(KEY, 3):
        np.testing.assert_array_equal(project_conflicting(g, k)["w"], g["w"])
    params = {"w": jnp.zeros(3)}
    surgery, _ = pcgrad().update(g, pcgrad().init(params))
    mean, _ = task_mean().update(g, task_mean().init(params))
    np.testing.assert_allclose(surgery["w"], g["w"].mean(0), rtol=1e-7)
    np.testing.assert_allclose(mean["w"], g["w"].mean(0), rtol=1e-7)


def test_pcgrad_order_is_random_per_step_and_reproducible():
    """Three tasks where the result depends on the order of projections; the state's key moves on."""
    g = {"w": jnp.array([[1.0, 0.2], [-1.0, 0.9], [0.3, -1.0]])}
    tx = optax.chain(pcgrad(seed=3), optax.sgd(1.0))
    state = tx.init({"w": jnp.zeros(2)})
    a, state1 = tx.update(g, state)
    b, _ = tx.update(g, state)
    np.testing.assert_array_equal(a["w"], b["w"])  # same state, same order
    assert not np.array_equal(state[0].key, state1[0].key)  # the next step draws new orders
    outs = {
        tuple(np.asarray(project_conflicting(g, k)["w"]).ravel().round(6)) for k in jax.random.split(KEY, 16)
    }
    assert len(outs) > 1  # the order matters here, and the keys produce different ones


def _grads(cfg):
    setup = run.Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    state, _ = initial_state(svi, setup.family, cfg.train, 0)
    params = svi.optim.get_params(state.optim_state)
    batch = setup.family.sample(jax.random.PRNGKey(5), cfg.train.meta_batch)
    key = jax.random.PRNGKey(9)

    def batch_loss(p):
        return svi.loss.loss(key, svi.constrain_fn(p), svi.model, svi.guide, batch)

    loss, grad = jax.jit(jax.value_and_grad(batch_loss))(params)
    losses, per_task = jax.jit(lambda p: task_gradients(svi, p, batch, key))(params)
    return loss, grad, losses, per_task


@pytest.mark.parametrize("method", ["maml", "fomaml"])
def test_mean_of_per_task_gradients_is_the_batch_gradient(small_cfg, method):
    loss, grad, losses, per_task = _grads(
        small_cfg(f"model.method={method}", "model.inner_steps=2", "model.net.hidden=[8, 8]")
    )
    assert losses.shape == (8,)
    np.testing.assert_allclose(losses.mean(), loss, rtol=1e-5)
    for k in grad:
        np.testing.assert_allclose(per_task[k].mean(0), grad[k], rtol=1e-4, atol=1e-6)


def test_a_batch_level_kl_is_counted_once(small_cfg):
    """MR-MAML(W): loss = mean NLL + beta KL(q(W) || p(W)). Each one-task loss holds the KL once (and
    the same weight draw: the global latent's shape does not depend on the batch), so their mean
    holds it once, like the batch loss."""
    loss, grad, losses, per_task = _grads(
        small_cfg(
            "task.family='nme_sinusoid'",
            "model.method=mr_maml_w",
            "model.params.beta=0.5",
            "model.net.hidden=[8, 8]",
        )
    )
    np.testing.assert_allclose(losses.mean(), loss, rtol=1e-5)
    for k in grad:
        np.testing.assert_allclose(per_task[k].mean(0), grad[k], rtol=1e-4, atol=1e-6)


def test_pcgrad_fit_learns_and_resumes_bit_identically(small_cfg, tmp_path):
    cfg = small_cfg(
        "train.task_gradients='pcgrad'",
        "model.net.hidden=[16]",
        "train.lr=0.01",
        "train.steps=100",
        "train.log_every=25",
        "train.eval_every=50",
        "train.checkpoint_every=50",
    )
    setup = run.Setup.from_config(cfg)

    def go(**kw):
        return fit(setup.method, setup.family, cfg.train, seed=0, progress=False, **kw)

    full = go()
    loss = np.asarray(full.trace.loss)
    assert loss[-25:].mean() < 0.9 * loss[:25].mean()
    go(run_dir=tmp_path, until=50)
    resumed = go(run_dir=tmp_path, resume=True)
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(full.trace.loss, resumed.trace.loss)


def test_pcgrad_nan_guard(small_cfg, tmp_path):
    cfg = small_cfg(
        "train.task_gradients='pcgrad'", "train.lr=1e30", "train.steps=50", "model.net.hidden=[8]"
    )
    setup = run.Setup.from_config(cfg)
    with pytest.raises(NonFiniteError, match=r"at step \d+; last good state \(step 0\) kept in .*state\.npz"):
        fit(setup.method, setup.family, cfg.train, seed=0, run_dir=tmp_path, progress=False)
    _, kept = run.restore(cfg, tmp_path)
    assert kept.step == 0 and all(bool(jnp.all(jnp.isfinite(v))) for v in kept.params.values())
