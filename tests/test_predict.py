"""The posterior predictive of a method that declares itself deterministic (Method.deterministic): one
run of the model gives what S runs of numpyro's Predictive give, and y is drawn from the likelihood."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry
from bayesmeta.predict import predictive
from bayesmeta.registry import build_method, make_family
from tests.clusters import BASE
from tests.helpers import TINY

REGRESSION = [
    ("maml", []),
    ("maml", ["model.noise='heteroscedastic'"]),
    ("l2f", []),
    ("taml", []),
    ("hsml", []),
    ("mumomaml", []),
    ("rebal", []),
    ("mtnet", ["model.params.test_masks='mode'"]),
    ("cnp", []),
    ("finetune", []),
]
CLASSIFICATION = [
    ("protonet", []),
    ("matching", []),
    ("tadam", []),
    ("siamese", []),
    ("gnn", []),
    ("snail", ["model.params.shuffle=false"]),
    ("nearest", []),
]
CASES = [(n, [*TINY, *o]) for n, o in REGRESSION] + [(n, [*BASE, *o]) for n, o in CLASSIFICATION]


def _setup(name: str, overrides: list[str]):
    cfg = registry.load_config(None, [*overrides, f"model.method='{name}'"])
    family = make_family(cfg.task)
    method = build_method(cfg.model, family.x_dim, family.y_dim)
    batch = family.sample(jax.random.PRNGKey(4), 3)
    svi = SVI(method.model, method.guide, optax.sgd(0.0), Trace_ELBO())
    return cfg, method, batch, svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(3), batch))


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_a_deterministic_method_predicts_what_s_runs_of_predictive_give(name, overrides):
    """The declaration holds (S runs of the model give one f) and the one-run path gives that f, the
    likelihood's draw sites, and y of the same shape and type."""
    cfg, method, batch, params = _setup(name, overrides)
    assert method.deterministic
    sites = ("y", "f", *method.likelihood.draw_sites)
    key = jax.random.PRNGKey(7)
    general = predictive(dataclasses.replace(method, deterministic=False), 2, 3, sites)(params, batch, key)
    fast = predictive(method, 2, 3, sites)(params, batch, key)
    for site in sites[1:]:
        np.testing.assert_allclose(general[site], np.broadcast_to(general[site][:1], general[site].shape))
        np.testing.assert_allclose(fast[site], general[site], rtol=1e-5, atol=1e-6)
    assert fast["y"].shape == general["y"].shape and fast["y"].dtype == general["y"].dtype


def test_the_draws_of_y_follow_the_likelihood_at_f():
    """Gaussian: y's draws have mean f and sd model.noise_sd; categorical: class frequencies f."""
    cfg, method, batch, params = _setup("maml", [*TINY, "model.noise_sd=0.5"])
    out = predictive(method, 1, 4000, ("y", "f"))(params, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out["y"].mean(0), out["f"][0], atol=0.05)
    np.testing.assert_allclose(out["y"].std(0), 0.5, atol=0.03)
    assert not np.allclose(out["y"][0], out["y"][1])
    cfg, method, batch, params = _setup("protonet", BASE)
    out = predictive(method, 1, 4000, ("y", "f"))(params, batch, jax.random.PRNGKey(0))
    ways = out["f"].shape[-1]
    freq = (np.asarray(out["y"])[..., None] == np.arange(ways)).mean(0)
    np.testing.assert_allclose(freq, out["f"][0], atol=0.04)
