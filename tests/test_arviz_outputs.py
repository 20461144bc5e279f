"""inference.nc as ArviZ reads it: loo and compare over runs, named dims, described variables, y and f
aligned for the predictive checks, point estimates apart from posterior draws; the site layouts."""

from __future__ import annotations

import re

import arviz_plots as azp
import arviz_stats as azs
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from scipy import stats

from bayesmeta import registry, run
from bayesmeta.likelihoods import Categorical
from bayesmeta.report import ppc_view
from bayesmeta.sites import site_layout
from tests.conftest import SMALL

# LLAMA samples its predictive functions (Laplace draws around phi), so the draws' log-likelihoods
# vary, and PSIS needs at least 25 of them (5 tail draws)
LLAMA = [
    *SMALL,
    "model.method='llama'",
    "train.steps=50",
    "train.log_every=50",
    "train.eval_every=50",
    "train.checkpoint_every=50",
    "eval.tasks=10",
    "eval.batch=10",
    "eval.samples=25",
    "eval.inner_steps=[1, 5]",
    "eval.plot_tasks=2",
    "eval.memorization_tasks=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small LLAMA runs (seeds 0 and 1) evaluated on the same tasks: their inference.nc trees."""
    trees = {}
    for seed in (0, 1):
        run_dir = tmp_path_factory.mktemp(f"llama{seed}")
        run.train(registry.load_config(None, [*LLAMA, f"seed={seed}"]), run_dir, progress=False)
        with xr.open_datatree(run_dir / "inference.nc", engine="h5netcdf") as dt:
            trees[f"seed {seed}"] = dt.load()
    return trees


def test_loo_and_compare_run_on_two_runs(runs):
    for dt in runs.values():
        with pytest.raises(TypeError, match="several log likelihood arrays"):  # a step count must be chosen
            azs.loo(dt)
        elpd = azs.loo(dt, var_name="y_steps_5")
        assert np.isfinite(elpd.elpd) and elpd.n_data_points == 10 * 10 and elpd.n_samples == 25
    table = azs.compare(runs, var_name="y_steps_5")
    assert set(table.index) == set(runs) and np.all(np.isfinite(table["elpd"]))
    assert table["weight"].sum() == pytest.approx(1.0)


def test_log_likelihood_is_the_gaussian_density_of_the_observed_targets(runs):
    dt = runs["seed 0"]
    f = dt["posterior_predictive"]["f"].sel(inner_steps=5).values[0]  # (draw, task, point, output)
    y = dt["observed_data"]["y"].sel(inner_steps=5).values
    expected = stats.norm.logpdf(y, f, registry.load_config(None, LLAMA).model.noise_sd)[..., 0]
    np.testing.assert_allclose(dt["log_likelihood"]["y_steps_5"].values[0], expected, rtol=1e-4, atol=1e-4)


def test_every_dim_is_named_and_every_variable_described(runs):
    dt = runs["seed 0"]
    for path, node in dt.subtree_with_keys:
        assert not [d for d in node.dims if re.search(r"_dim_\d", d)], path
        undescribed = [v for v in node.data_vars if "description" not in node[v].attrs]
        assert not undescribed, (path, undescribed)
        assert not [v for v in node.data_vars if "." in v], path
    assert dt["point_estimates"]["theta_layer_0_w"].dims == ("theta_layer_0_in", "theta_layer_0_out")
    assert dt["point_estimates"]["theta_layer_0_b"].dims == ("theta_layer_0_out",)


def test_y_and_f_share_dims_and_the_predictive_checks_draw(runs):
    dt = runs["seed 0"]
    pp, observed = dt["posterior_predictive"], dt["observed_data"]
    assert pp["y"].dims == pp["f"].dims == ("chain", "draw", "inner_steps", "task", "point", "output")
    assert observed["y"].dims == pp["y"].dims[2:]
    np.testing.assert_array_equal(pp["x"], dt["constant_data"]["x_query"].values[..., 0])
    np.testing.assert_array_equal(observed["x"], pp["x"])
    np.testing.assert_array_equal(dt["predictions"]["x"], dt["predictions_constant_data"]["x"].values[..., 0])
    azp.plot_ppc_dist(dt, backend="none")
    azp.plot_ppc_dist(dt, var_names="y", cols=["inner_steps"], backend="none")
    view = ppc_view(dt, 5)  # one step count, task x point x output as one dim: what plot_ppc_pit takes
    assert view["posterior_predictive"]["y"].dims == ("chain", "draw", "obs")
    np.testing.assert_array_equal(view["observed_data"]["y"], observed["y"].sel(inner_steps=5).values.ravel())
    azp.plot_ppc_pit(view, backend="none")


def test_point_estimates_are_not_a_posterior(runs):
    """LLAMA has no stochastic meta-parameters: theta is a point estimate, and posterior only carries
    the predictive draws' chain and draw (for loo's relative efficiency)."""
    dt = runs["seed 0"]
    assert not dt["posterior"].data_vars
    assert dict(dt["posterior"].sizes) == {"chain": 1, "draw": 25}
    assert "theta_head_w" in dt["point_estimates"].data_vars
    assert not {"chain", "draw"} & set(dt["point_estimates"].dims)
    assert np.all(np.isfinite(dt["point_estimates"]["theta_head_w"].values))


def test_site_layouts_name_dims_by_role():
    assert site_layout("theta.block_0.w", 4).dims == [
        f"theta_block_0_{a}" for a in ("row", "column", "in", "out")
    ]
    assert site_layout("theta.encoder.head.b", 1).dims == ["theta_encoder_head_out"]
    # a Gaussian kernel, its variational parameters and its bias share the layer's dims
    kernel = site_layout("encoder.layer_0", 2)
    assert kernel.name == "encoder_layer_0" and kernel.dims == ["encoder_layer_0_in", "encoder_layer_0_out"]
    assert site_layout("encoder.layer_0.rho", 2).dims == kernel.dims
    assert site_layout("encoder_bias.layer_0", 1).dims == ["encoder_layer_0_out"]
    # learned rates: per inner step (MAML++), or per entry shared by the steps (Meta-SGD)
    assert site_layout("inner_lr.layer_0.w", 1).dims == ["inner_lr_step"]
    assert site_layout("inner_lr.layer_0.w", 3).dims == [
        "inner_lr_step",
        "inner_lr_layer_0_in",
        "inner_lr_layer_0_out",
    ]
    assert site_layout("noise_sd", 0).dims == []
    assert site_layout("prior_mean", 1).dims == ["prior_mean_axis_0"]  # a site of unknown role


def test_categorical_log_prob_broadcasts_labels_over_draws():
    probs = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 4, 6)))
    y = jnp.asarray(np.random.default_rng(1).integers(0, 5, size=(4, 6)))
    logp = np.asarray(Categorical().log_prob(probs, y))
    assert logp.shape == (3, 4, 6)
    np.testing.assert_allclose(logp[2, 1, 3], np.log(probs[2, 1, 3, y[1, 3]]), rtol=1e-6)
