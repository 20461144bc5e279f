"""Draws that blow up are never silent: methods that check their draws report how many of each task's
draws ended adaptation with a higher support loss than they started with, and can reject them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry, run
from bayesmeta.likelihoods import Gaussian
from bayesmeta.method import Method, no_guide
from bayesmeta.predict import accepted_draws, evaluate, predictive
from bayesmeta.sites import observe, record_draw_check
from bayesmeta.tasks import TaskBatch


def test_accepted_draws_replace_the_blown_up_ones_in_turn():
    blown = jnp.array([[True, False, True], [False, False, True], [True, False, True], [False, False, True]])
    idx = np.asarray(accepted_draws(blown))
    # task 0: accepted draws 1 and 3 stand in for draws 0 and 2; task 1 keeps all; task 2 has none
    np.testing.assert_array_equal(idx[:, 0], [1, 1, 3, 3])
    np.testing.assert_array_equal(idx[:, 1], [0, 1, 2, 3])
    np.testing.assert_array_equal(idx[:, 2], [0, 1, 2, 3])


def _toy() -> Method:
    """A draw z ~ N(0, 1) per task that 'blows up' when z > 0 (its support loss goes from 0 to z)."""

    def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
        t, n = batch.x_query.shape[:2]
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([t]).to_event(1))
        record_draw_check(jnp.zeros(t), z)
        observe(Gaussian(0.1), jnp.broadcast_to(z[:, None, None], (t, n, 1)), batch.y_query)

    return Method("toy", model, no_guide, likelihood=Gaussian(0.1), draw_check=True)


@pytest.mark.parametrize("rule", ["keep", "reject"])
def test_blown_up_draws_are_counted_and_optionally_rejected(rule):
    batch = TaskBatch(jnp.zeros((50, 2, 1)), jnp.zeros((50, 2, 1)), jnp.zeros((50, 3, 1)), None, {})
    out = predictive(_toy(), 1, 40, ("f",), rule)({}, batch, jax.random.PRNGKey(0))
    f, blown = np.asarray(out["f"][:, :, 0, 0]), np.asarray(out["blown_up"])
    assert blown.shape == (40, 50) and 0.3 < blown.mean() < 0.7  # about half of N(0, 1) is > 0
    if rule == "keep":
        np.testing.assert_array_equal(blown, f > 0)
    else:  # every task has accepted draws (40 draws), so none of the kept values is > 0
        assert (f <= 0).all() and len(np.unique(f[:, 0])) > 1


def test_evaluate_reports_the_fraction_of_each_tasks_draws_that_blew_up():
    batch = TaskBatch(
        jnp.zeros((30, 2, 1)), jnp.zeros((30, 2, 1)), jnp.zeros((30, 3, 1)), jnp.zeros((30, 3, 1)), {}
    )
    ev = evaluate(_toy(), Gaussian(0.1), {}, [batch], (0, 1), 20, jax.random.PRNGKey(2), blown_up="reject")
    z = ev.draws[1]["f"][:, :, 0, 0]  # after rejection: no kept draw is > 0 ...
    assert (z <= 0).all()
    frac = ev.per_task[1]["blown_up_draws"]  # ... but the count is of the draws before it
    assert frac.shape == (30,) and 0.3 < frac.mean() < 0.7
    assert "blown_up_draws@1" in ev.summary() and "blown_up" not in ev.draws[1]


@pytest.mark.parametrize(
    ("method", "lr", "blown"),
    [
        ("platipus", 0.01, False),  # small gradient steps lower every draw's support loss
        ("platipus", 3.0, True),  # large ones overshoot
        ("llama", 0.01, False),  # at its mode (no Laplace noise): one small step down
    ],
)
def test_sampling_methods_check_their_draws(method, lr, blown):
    """PLATIPUS and LLAMA record each draw's support loss before and after adaptation."""
    extra = ["model.params.sample_posterior=false"] if method == "llama" else []
    cfg = registry.load_config(
        None,
        [
            "task.family='sine_line'",
            "task.shots=5",
            "task.queries=3",
            f"model.method='{method}'",
            "model.net.hidden=[8]",
            "model.inner_steps=1",
            f"model.inner_lr={lr}",
            *extra,
        ],
    )
    setup = run.Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(1), 30)
    svi = SVI(setup.method.model, setup.method.guide, optax.sgd(0.0), Trace_ELBO())
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))
    out = predictive(setup.method, 1, 4, ("f",))(params, batch, jax.random.PRNGKey(2))
    frac = np.asarray(out["blown_up"]).mean()
    assert out["blown_up"].shape == (4, 30)
    assert frac > 0.5 if blown else frac == 0
