"""MAML-RL and MAML+L2F on 2D navigation: the environment, the policy-gradient estimators, the inner
step and a tiny meta-training run (bayesmeta/rl/navigation.py, models/maml_rl.py)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.fit import fit, initial_state, make_svi
from bayesmeta.nets import MLP
from bayesmeta.rl.navigation import (
    GaussianPolicy,
    Navigation,
    PointNavigation,
    PolicyGradient,
    adaptation_returns,
    baseline_features,
    linear_baseline,
    mean_return,
    surrogate,
)
from bayesmeta.run import Setup

NAV = "'bayesmeta.rl.navigation:Navigation'"
TINY = [
    f"task.family={NAV}",
    f"eval.task.family={NAV}",
    "task.params.horizon=20",
    "eval.task.params.horizon=20",
    "model.net.hidden=[16]",
    "model.net.activation='tanh'",
    "model.inner_lr=0.5",
    "model.params.trajectories=10",
    "train.meta_batch=8",
    "train.lr=0.02",
    "train.steps=30",
    "train.log_every=10",
]


def test_environment_step_matches_a_hand_computation():
    env = PointNavigation()
    task = {"goal": jnp.array([0.3, -0.4])}
    # action (0.5, -3.0) scales by 0.1 to (0.05, -0.3), clipped to (0.05, -0.1)
    new, r = env.step(task, jnp.array([0.1, 0.2]), jnp.array([0.5, -3.0]))
    np.testing.assert_allclose(new, [0.15, 0.1], atol=1e-7)
    np.testing.assert_allclose(r, -(0.15**2 + 0.5**2), rtol=1e-6)
    _, r = PointNavigation(reward="distance").step(task, jnp.array([0.1, 0.2]), jnp.array([0.5, -3.0]))
    np.testing.assert_allclose(r, -np.sqrt(0.15**2 + 0.5**2), rtol=1e-6)
    np.testing.assert_array_equal(env.reset(task), [0.0, 0.0])


def test_family_carries_goals_in_its_range_and_declares_an_environment():
    from bayesmeta.tasks import Environment

    fam = Navigation(Navigation.Params())
    batch = fam.sample(jax.random.PRNGKey(0), 500)
    goal = np.asarray(batch.info["goal"])
    assert goal.shape == (500, 2) and goal.min() >= -0.5 and goal.max() <= 0.5 and goal.std() > 0.25
    assert isinstance(fam, Environment) and fam.environment.horizon == 100


# A one-step bandit: a ~ N(mu, sigma^2), r = -(a - c)^2, so J = -((mu - c)^2 + sigma^2),
# dJ/dmu = -2 (mu - c), dJ/dlog_sigma = -2 sigma^2, d2J/dmu2 = -2.
MU, LOG_SIGMA, C, N, BATCHES = 0.3, np.log(0.7), -0.5, 10, 4000


def bandit_estimates(estimator: str, key: jax.Array, baseline: float = 0.0):
    """Per batch of N pulls: (gradient estimate (mu, log_sigma), d2/dmu2 of the surrogate)."""

    def one(k):
        eps = jax.random.normal(k, (N, 1))
        a = jax.lax.stop_gradient(MU + jnp.exp(LOG_SIGMA) * eps)  # the samples, constants
        rew = -jnp.square(a - C)

        def surr(theta):
            mu, log_sigma = theta
            logp = -0.5 * jnp.square((a - mu) / jnp.exp(log_sigma)) - log_sigma
            return surrogate(logp, rew, jnp.full_like(rew, baseline), 1.0, estimator, normalize=False)

        theta = jnp.array([MU, LOG_SIGMA])
        return jax.grad(surr)(theta), jax.hessian(surr)(theta)[0, 0]

    return jax.jit(jax.vmap(one))(jax.random.split(key, BATCHES))


@pytest.mark.parametrize("estimator", ["dice", "reinforce"])
@pytest.mark.parametrize("baseline", [0.0, -1.0])
def test_policy_gradient_is_unbiased_on_a_bandit(estimator, baseline):
    grads, _ = bandit_estimates(estimator, jax.random.PRNGKey(1), baseline)
    g = np.asarray(grads, np.float64)
    exact = np.array([-2 * (MU - C), -2 * np.exp(2 * LOG_SIGMA)])
    se = g.std(0, ddof=1) / np.sqrt(BATCHES)
    assert np.all(np.abs(g.mean(0) - exact) < 4 * se), (g.mean(0), exact, se)
    assert np.all(se < 0.05 * np.abs(exact))  # the check has power: the error bar is small


def test_dice_second_derivative_is_unbiased_and_reinforce_is_not():
    exact = -2.0
    dice = np.asarray(bandit_estimates("dice", jax.random.PRNGKey(2))[1], np.float64)
    assert abs(dice.mean() - exact) < 4 * dice.std(ddof=1) / np.sqrt(BATCHES)
    plain = np.asarray(bandit_estimates("reinforce", jax.random.PRNGKey(2))[1], np.float64)
    # E[d2 log p / dmu2 r] = -(1 / sigma^2) E[r] = ((mu - c)^2 + sigma^2) / sigma^2, not -2
    expected_plain = ((MU - C) ** 2 + np.exp(2 * LOG_SIGMA)) / np.exp(2 * LOG_SIGMA)
    assert abs(plain.mean() - expected_plain) < 4 * plain.std(ddof=1) / np.sqrt(BATCHES)
    assert abs(plain.mean() - exact) > 10 * plain.std(ddof=1) / np.sqrt(BATCHES)


def test_one_inner_step_raises_the_expected_return_on_a_fixed_goal():
    env = PointNavigation(horizon=20)
    pg = PolicyGradient(env, GaussianPolicy(MLP(2, 2, (16,), "tanh")), trajectories=20)
    theta = pg.policy.init(jax.random.PRNGKey(0))
    task = {"goal": jnp.array([0.4, 0.3])}
    evaluate = PolicyGradient(env, pg.policy, trajectories=200)

    def gain(key):
        k1, k2, k3 = jax.random.split(key, 3)
        phi = pg.adapt(theta, task, k1, 1, 0.5)[0]
        return mean_return(evaluate.sample(phi, task, k2)) - mean_return(evaluate.sample(theta, task, k3))

    gains = np.asarray(jax.jit(jax.vmap(gain))(jax.random.split(jax.random.PRNGKey(3), 8)))
    assert gains.mean() > 4 * gains.std(ddof=1) / np.sqrt(gains.size), gains


@pytest.fixture(scope="module")
def trained():
    cfg = registry.load_config(None, [*TINY, "model.method='maml_rl'"])
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train, 0)
    start = svi.get_params(initial_state(svi, setup.family, cfg.train, 0)[0])
    result = fit(setup.method, setup.family, cfg.train, seed=0, progress=False)
    return setup, start, result.params


def test_meta_training_improves_the_post_adaptation_return(trained):
    setup, start, params = trained
    batch = setup.family.sample(jax.random.PRNGKey(99), 40)
    run = jax.jit(lambda p, k: adaptation_returns(setup.method, p, batch, k, 1)["returns"])
    before = np.asarray(run(start, jax.random.PRNGKey(5)))
    after = np.asarray(run(params, jax.random.PRNGKey(5)))
    assert before.shape == (40, 2)
    # the return after one step is at least 30% closer to 0 (about 50% in this run: -3.5 -> -1.7)
    assert after[:, 1].mean() > 0.7 * before[:, 1].mean(), (before.mean(0), after.mean(0))


def test_l2f_rl_records_gamma_per_task_and_layer_in_the_unit_interval():
    from numpyro import handlers

    cfg = registry.load_config(None, [*TINY, "model.method='l2f_rl'"])
    setup = Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(0), 3)
    values = jax.jit(
        lambda b: {
            k: v["value"]
            for k, v in handlers.trace(handlers.seed(setup.method.model, 0)).get_trace(b).items()
        }
    )(batch)
    gamma = np.asarray(values["gamma"])
    assert gamma.shape == (3, 5)  # head.w, head.b, layer_0.w, layer_0.b, log_std
    np.testing.assert_allclose(gamma, 0.9, atol=1e-6)  # the attenuator starts at gamma_init
    assert "l2f.attenuator.head.b" in values and "objective" in values


def test_a_family_without_an_environment_is_refused():
    cfg = registry.load_config(None, ["model.method='maml_rl'"])
    with pytest.raises(ConfigError, match="Environment"):
        Setup.from_config(cfg)


def test_the_cli_refuses_a_family_of_mdps_in_one_line_and_writes_nothing(tmp_path, capsys):
    """bayesmeta fit evaluates a predictive of y at query points, which rollout-collecting methods do
    not have: a navigation config is a config error naming task.family, and no folder is made."""
    from bayesmeta.cli import main

    base = Path(__file__).parents[1] / "experiments" / "meta_rl" / "navigation" / "base.toml"
    code = main(["fit", str(base), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("bayesmeta: config error: task.family:"), err
    assert "family of MDPs" in err[-1] and not (tmp_path / "run").exists()


def test_linear_baseline_retries_a_singular_solve_with_more_ridge():
    # a policy that keeps every trajectory at one point makes [s, s^2, 1] collinear: at reg 1e-5 the
    # float32 solve is not finite (this stopped a 500-iteration MAML run at step 250); the retry's
    # larger ridge gives the least-squares cubic in t, which is all the features can express here
    obs = jnp.full((20, 100, 2), 3.0)
    target = jax.random.normal(jax.random.PRNGKey(0), (20, 100)) + jnp.linspace(0, 5, 100) ** 2
    x = baseline_features(obs).reshape(-1, 8)
    plain = jnp.linalg.solve(x.T @ x + 1e-5 * jnp.eye(8), x.T @ target.reshape(-1))
    assert not jnp.all(jnp.isfinite(plain))
    t = np.tile(np.arange(100) / 100.0, 20)
    cubic = np.stack([t, t**2, t**3, np.ones_like(t)], 1)
    fit64 = cubic @ np.linalg.lstsq(cubic, np.asarray(target, np.float64).reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(linear_baseline(obs, target)).reshape(-1), fit64, atol=0.1)
    # a well-posed batch is fitted at the first ridge, as before
    obs = jax.random.uniform(jax.random.PRNGKey(1), (20, 100, 2), minval=-0.5, maxval=0.5)
    x = baseline_features(obs).reshape(-1, 8)
    w = jnp.linalg.solve(x.T @ x + 1e-5 * jnp.eye(8), x.T @ target.reshape(-1))
    np.testing.assert_allclose(linear_baseline(obs, target).reshape(-1), x @ w, rtol=1e-4, atol=1e-4)


def test_an_inner_clip_is_refused_by_the_policy_gradient_inner_loop():
    """model.inner_clip has no effect on the policy-gradient inner loop, so setting it is a config error
    naming the key, not a silent no-op."""
    base = Path(__file__).parents[1] / "experiments" / "meta_rl" / "navigation" / "base.toml"
    with pytest.raises(ConfigError, match=r"model.inner_clip: the policy-gradient inner loop does not clip"):
        registry.load_config(base, ["model.inner_clip=1.0"])
