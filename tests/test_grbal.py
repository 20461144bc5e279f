"""GrBAL / ReBAL (issue #19 part A): the pendulum step by hand; the family's targets are the env's
steps; MPC planners return their best candidate and the model rollout's cost is the true one under
an exact model; GrBAL's (MAML's) adaptation step and MB+DE's update lower the loss on the recent
window; ReBAL fits a small family."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import control, registry
from bayesmeta.fit import fit
from bayesmeta.registry import build_method, make_family
from bayesmeta.tasks.dynamics import Dynamics, Pendulum
from tests.helpers import fit_lowers_loss

FAMILY = ["task.family='pendulum_dynamics'", "task.shots=8", "task.queries=8"]
SMALL = [*FAMILY, "model.net.hidden=[32, 32]", "train.meta_batch=16", "train.log_every=50"]


def test_pendulum_step_by_hand():
    """theta'' = 3g/(2l) sin(theta) + 3(k u - b omega)/(m l^2), semi-implicit Euler, u clipped."""
    env = Pendulum(dt=0.05, gravity=10.0, max_speed=8.0, max_torque=2.0)
    d = Dynamics(2.0, 0.5, 0.2, 0.5)
    acc = 30.0 * math.sin(0.3) + 3.0 * (0.5 * 1.5 - 0.2 * 1.0) / (2.0 * 0.25)
    omega = 1.0 + 0.05 * acc
    np.testing.assert_allclose(
        env.step(d, jnp.array([0.3, 1.0]), 1.5), [0.3 + 0.05 * omega, omega], rtol=1e-6
    )
    # the torque is clipped at max_torque, the speed at max_speed
    np.testing.assert_allclose(
        env.step(d, jnp.array([0.3, 1.0]), 5.0), env.step(d, jnp.array([0.3, 1.0]), 2.0)
    )
    assert float(env.step(d, jnp.array([1.5, 7.9]), 2.0)[1]) == 8.0
    # vmapped over tasks = one task at a time; a rollout's dynamics may change per step
    ds = Dynamics(*(jnp.array([1.0, 2.0]),) * 4)
    s = jnp.array([[0.1, 0.0], [2.0, -1.0]])
    both = jax.vmap(env.step)(ds, s, jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(both[1], env.step(Dynamics(2.0, 2.0, 2.0, 2.0), s[1], -1.0))
    per_step = env.rollout(ds, s[0], jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(per_step[2], env.step(Dynamics(2.0, 2.0, 2.0, 2.0), per_step[1], -1.0))
    assert float(Pendulum.cost(jnp.array([2 * math.pi + 0.5, 1.0]), 2.0)) == pytest.approx(0.25 + 0.1 + 0.004)


def test_family_windows_are_env_transitions():
    """Support then query are consecutive transitions of one task's dynamics: each y is the scaled
    change of the env's step from the state and action x encodes, and the query continues the support."""
    fam = make_family(registry.load_config(None, FAMILY).task)
    b = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(0), 5)
    env = fam.env
    x = jnp.concatenate([b.x_support, b.x_query], 1)
    y = jnp.concatenate([b.y_support, b.y_query], 1)
    s = jnp.stack([jnp.arctan2(x[..., 1], x[..., 0]), x[..., 2] * env.max_speed], -1)
    u = x[..., 3] * env.max_torque
    d = Dynamics(**b.info)
    step = jax.vmap(jax.vmap(env.step, in_axes=(None, 0, 0)))(d, s, u)
    np.testing.assert_allclose(env.targets(s, step), y, atol=1e-5)
    s_next = env.apply_change(s[:, :-1], y[:, :-1])  # the next input's state is this one's successor
    np.testing.assert_allclose(jnp.cos(s_next[..., 0]), x[:, 1:, 0], atol=1e-5)
    np.testing.assert_allclose(s_next[..., 1], s[:, 1:, 1], atol=1e-4)


def test_planners_return_their_best_candidate():
    """Random shooting returns the argmin of a known cost over its candidates (rebuilt from the same
    key) and that cost; CEM's answer costs what it says and no more than its first population's best."""
    target = jnp.linspace(-1.0, 1.0, 5)

    def cost(a):
        return jnp.sum(jnp.square(a - target), -1)

    key = jax.random.PRNGKey(3)
    plan, c = control.random_shooting(64, 5, -2.0, 2.0)(key, cost)
    candidates = jax.random.uniform(key, (64, 5), minval=-2.0, maxval=2.0)
    i = int(jnp.argmin(cost(candidates)))
    np.testing.assert_array_equal(plan, candidates[i])
    assert float(c) == float(cost(candidates).min())
    plan, c = control.cem(64, 5, -2.0, 2.0, iterations=4, elites=8)(key, cost)
    assert float(c) == pytest.approx(float(cost(plan[None])[0]))
    first = jnp.clip(0.0 + 2.0 * jax.random.normal(jax.random.split(key, 4)[0], (64, 5)), -2.0, 2.0)
    assert float(c) <= float(cost(first).min()) and float(c) < 0.2

    # a NaN cost is never chosen
    def nan_first(a):
        return jnp.where(jnp.arange(a.shape[0]) == 0, jnp.nan, cost(a))

    assert np.isfinite(control.random_shooting(8, 5, -2.0, 2.0)(key, nan_first)[1])


def test_mpc_with_the_exact_model():
    """Under the exact model, the predicted cost of an action sequence is its true cost, and a one-step
    MPC episode takes the planned action; its model error is zero."""
    env = Pendulum()
    d = Dynamics(1.0, 1.0, 0.1, 0.8)

    def exact(sx, sy, qx):
        s = jnp.stack([jnp.arctan2(qx[:, 1], qx[:, 0]), qx[:, 2] * env.max_speed], -1)
        return env.targets(s, jax.vmap(lambda a, u: env.step(d, a, u))(s, qx[:, 3] * env.max_torque))

    s0 = jnp.array([2.5, -1.0])
    actions = jax.random.uniform(jax.random.PRNGKey(1), (3, 6), minval=-2.0, maxval=2.0)
    predicted = control.predicted_cost(env, lambda qx: exact(None, None, qx), s0)(actions)
    true = jnp.stack([env.cost(env.rollout(d, s0, a)[1:], a).sum() for a in actions])
    np.testing.assert_allclose(predicted, true, rtol=1e-4)
    s, buf = control.warmup(env, d, s0, jax.random.PRNGKey(2), 4)
    sched = jax.tree.map(lambda a: jnp.full((3,), a), d)
    ep = jax.jit(control.episode, static_argnums=(0, 2, 3))(
        env, sched, control.adapting(exact), control.cem(32, 4, -2.0, 2.0), s, jax.random.PRNGKey(5), buf
    )
    np.testing.assert_allclose(ep.states[1], env.step(d, s, ep.actions[0]), rtol=1e-6)
    assert float(ep.model_error.max()) < 1e-8
    np.testing.assert_allclose(ep.buffer[1][-1], env.targets(ep.states[-2], ep.states[-1]), rtol=1e-5)


@pytest.fixture(scope="module")
def grbal():
    """MAML (GrBAL) fitted briefly on the pendulum family: (config, method, params, family)."""
    cfg = registry.load_config(None, [*SMALL, "model.inner_lr=0.05", "train.steps=150"])
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    result = fit(method, fam, cfg.train, seed=0, progress=False)
    return cfg, method, result.params, fam


def test_grbal_step_lowers_window_loss(grbal):
    """The adaptation step (1 inner step) lowers the model's MSE on the recent window it adapts on, on
    nearly every window, through the engine's predictive (control.predictor)."""
    _, method, params, fam = grbal
    b = fam.sample(jax.random.PRNGKey(9), 40)
    before, after = control.predictor(method, params, 0), control.predictor(method, params, 1)

    def mse(f, i):
        return float(jnp.mean(jnp.square(f(b.x_support[i], b.y_support[i], b.x_support[i]) - b.y_support[i])))

    pairs = np.array([(mse(before, i), mse(after, i)) for i in range(40)])
    assert np.mean(pairs[:, 1] < pairs[:, 0]) > 0.9 and pairs[:, 1].mean() < 0.95 * pairs[:, 0].mean()


def test_dynamic_evaluation_lowers_window_nll(grbal):
    """MB+DE's update is SGD on the window's NLL: one step from the fitted parameters lowers it, and its
    gradient is the model's (finite differences along the gradient)."""
    _, method, params, fam = grbal
    b = fam.sample(jax.random.PRNGKey(11), 1)
    sx, sy = b.x_support[0], b.y_support[0]
    de = control.dynamic_evaluation(method, params, lr=0.05, steps=1)
    nll = jax.jit(lambda p: control.window_nll(method, p, sx, sy))
    assert float(nll(de.update(params, sx, sy))) < float(nll(params))
    g = jax.grad(nll)(params)
    eps = 1e-3
    shifted = jax.tree.map(lambda a, d: a + eps * d, params, g)
    norm2 = sum(float(jnp.sum(jnp.square(v))) for v in jax.tree.leaves(g))
    assert (float(nll(shifted)) - float(nll(params))) / eps == pytest.approx(norm2, rel=0.05)
    # the DE model's prediction at fitted params is MB's: the zero-step predictive
    mb = control.predictor(method, params, 0)
    np.testing.assert_allclose(de.predict(params, sx, sy, sx), mb(sx, sy, sx), rtol=1e-6)


def test_rebal_fits():
    """ReBAL's SVI loss falls on the pendulum family (a tiny LSTM and MLP)."""
    cfg = registry.load_config(
        None, [*SMALL, "model.method='rebal'", "model.params.hidden=8", "train.steps=150", "train.lr=3e-3"]
    )
    fit_lowers_loss(cfg, ratio=0.95)


def test_rebal_reads_the_support_in_order():
    """ReBAL's prediction depends on the support transitions (their content and order), not on
    inner_steps: the LSTM state is the task's adaptation."""
    cfg = registry.load_config(
        None, [*FAMILY, "model.method='rebal'", "model.params.hidden=4", "model.net.hidden=[5]"]
    )
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    b = fam.sample(jax.random.PRNGKey(0), 2)
    svi = SVI(method.model, method.guide, __import__("optax").sgd(0.0), Trace_ELBO())
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(1), b))
    f = control.predictor(method, params, 0)
    base = f(b.x_support[0], b.y_support[0], b.x_query[0])
    np.testing.assert_allclose(
        control.predictor(method, params, 5)(b.x_support[0], b.y_support[0], b.x_query[0]), base
    )
    assert not np.allclose(f(b.x_support[1], b.y_support[1], b.x_query[0]), base)
    assert not np.allclose(f(b.x_support[0][::-1], b.y_support[0][::-1], b.x_query[0]), base)


def test_replay_is_the_episodes_model_error():
    """Replaying an episode's executed transitions gives the episode's own one-step model errors for a
    stateful model (its state updated on each new window, as MB+DE's parameters), and each error is
    the prediction from the state and window of the previous M transitions, computed here by hand."""
    env, d = Pendulum(), Dynamics(1.0, 1.0, 0.1, 0.8)
    model = control.OnlineModel(
        jnp.zeros(2),
        lambda st, sx, sy: 0.5 * st + 0.5 * sy.mean(0),
        lambda st, sx, sy, qx: st + 0.1 * qx[:, :2] + 0.01 * sy[-1],
    )
    s, buf = control.warmup(env, d, jnp.array([2.5, 0.0]), jax.random.PRNGKey(2), 4)
    sched = jax.tree.map(lambda a: jnp.full((5,), a), d)
    ep = control.episode(
        env, sched, model, control.random_shooting(8, 2, -2.0, 2.0), s, jax.random.PRNGKey(5), buf
    )
    xs, ys = env.features(ep.states[:-1], ep.actions), env.targets(ep.states[:-1], ep.states[1:])
    np.testing.assert_allclose(control.replay(model, buf, xs, ys), ep.model_error, rtol=1e-5, atol=1e-8)
    bx, by = buf
    state = model.update(model.init, bx, by)
    for t in range(5):
        pred = model.predict(state, bx, by, xs[t : t + 1])[0]
        assert float(ep.model_error[t]) == pytest.approx(float(jnp.sum(jnp.square(pred - ys[t]))), rel=1e-5)
        bx, by = jnp.concatenate([bx[1:], xs[t : t + 1]]), jnp.concatenate([by[1:], ys[t : t + 1]])
        state = model.update(state, bx, by)
