"""Method.inner_loop: a method that declares no inner loop predicts the same at every step count (so
the declaration is true), and the evaluation then computes one step count and copies it, with the same
results as computing each."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry
from bayesmeta.predict import evaluate, predictive
from bayesmeta.run import Setup
from tests.clusters import BASE as CLUSTERS

SMALL = {  # the methods that declare inner_loop=False, each on a small task family it accepts
    "protonet": (*CLUSTERS, "model.method='protonet'"),
    "tadam": (*CLUSTERS, "model.method='tadam'"),
    "matching": (*CLUSTERS, "model.method='matching'"),
    "siamese": (*CLUSTERS, "model.method='siamese'"),
    "nearest": (*CLUSTERS, "model.method='nearest'"),
    "gnn": (
        *CLUSTERS,
        "model.method='gnn'",
        "model.params.width=8",
        "model.params.layers=1",
        "model.params.edge_hidden=[1.0]",
    ),
    "mann": (*CLUSTERS, "model.method='mann'", "model.params.units=8", "model.params.slots=8"),
    "snail": (*CLUSTERS, "model.method='snail'", "model.params.keys=[4]", "model.params.values=[4]"),
    "cnp": ("model.method='cnp'",),
    "mr_cnp_w": ("model.method='mr_cnp_w'",),
    "mr_cnp_a": ("model.method='mr_cnp_a'",),
    "np": ("model.method='np'",),
    "versa": ("model.method='versa'",),
    "alpaca": ("model.method='alpaca'",),
    "alpaca_mixture": ("model.method='alpaca_mixture'",),
}


def setup_and_svi(overrides: tuple[str, ...]):
    """(Setup, an SVI over the method's model and guide) for a small config."""
    setup = Setup.from_config(registry.load_config(None, ["model.net.hidden=[8]", *overrides]))
    return setup, SVI(setup.method.model, setup.method.guide, optax.sgd(0.0), Trace_ELBO())


def built(overrides: tuple[str, ...]):
    """(setup, a batch of 2 tasks, the method's initial parameters) for a config."""
    setup, svi = setup_and_svi(overrides)
    batch = setup.family.sample(jax.random.PRNGKey(1), 2)
    return setup, batch, svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))


def lowered(overrides: tuple[str, ...]) -> tuple[bool, str, str]:
    """(the method's inner_loop, the StableHLO texts of its jitted predictive at 1 and at 3 test-time
    steps) for a config, lowered at abstract shapes: nothing is compiled or run."""
    setup, svi = setup_and_svi(overrides)
    key = jax.random.PRNGKey(0)
    batch = jax.eval_shape(lambda k: setup.family.sample(k, 2), key)
    params = jax.eval_shape(lambda k, b: svi.get_params(svi.init(k, b)), key, batch)
    one, three = (predictive(setup.method, s, 1, ("f",)).lower(params, batch, key).as_text() for s in (1, 3))
    return setup.method.inner_loop, one, three


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_declared_method_predicts_the_same_at_every_step_count(name):
    """Its predictive at 1 and at 3 steps lowers to the same program: on the same inputs, the same draws."""
    declared, one, three = lowered(SMALL[name])
    assert declared is False
    assert one == three


def test_the_check_tells_an_inner_loop_apart():
    """MAML's predictive, whose inner loop runs the steps, lowers to different programs at 1 and 3."""
    maml, one, three = lowered(("model.method='maml'",))
    assert maml is True and one != three


def test_evaluation_without_an_inner_loop_computes_once_with_the_same_results():
    """ProtoNet evaluated at steps (1, 3): with its declaration the model is traced for one prediction
    (no support loss: nothing adapts), without it for the support loss at 0, 1, 3 and both predictions
    (5), and every result, the divergence counts included, is the same."""
    setup, batch, params = built(SMALL["protonet"])
    traces = []

    def counted(method):
        def model(*args, **kwargs):
            traces.append(kwargs.get("inner_steps"))
            return method.model(*args, **kwargs)

        return dataclasses.replace(method, model=model)

    out = {}
    for declared in (False, True):
        traces.clear()
        method = counted(dataclasses.replace(setup.method, inner_loop=declared))
        out[declared] = evaluate(method, setup.likelihood, params, [batch], (1, 3), 2, jax.random.PRNGKey(5))
        assert len(traces) == (5 if declared else 1), traces
    declared, each = out[False], out[True]
    assert declared.support_loss == {}
    for s in (1, 3):
        np.testing.assert_array_equal(declared.diverged(s), each.diverged(s))
        assert not declared.diverged(s).any()
        for name, v in each.per_task[s].items():
            np.testing.assert_array_equal(declared.per_task[s][name], v)
        for site, v in each.draws[s].items():
            np.testing.assert_array_equal(declared.draws[s][site], v)


def test_without_an_inner_loop_a_task_with_predictions_not_finite_is_diverged():
    """ProtoNet with one task's support images set to NaN: that task, and only it, counts as diverged,
    at every step count (its support loss is not computed, its predictions are not finite)."""
    setup, batch, params = built(SMALL["protonet"])
    bad = batch._replace(x_support=batch.x_support.at[1].set(np.nan))
    ev = evaluate(setup.method, setup.likelihood, params, [bad], (1, 3), 2, jax.random.PRNGKey(5))
    for s in (1, 3):
        np.testing.assert_array_equal(ev.diverged(s), [False, True])
