"""Meta-regularization (Yin et al. 2020): the beta-weighted KL, the PAC-Bayes bound, the memorization
meter, the fresh-Adam optimizer, and short fits of the six NME-sinusoid methods."""

from __future__ import annotations

import json
import math

import arviz_plots as azp
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
import xarray as xr
from numpyro.infer import SVI, TraceMeanField_ELBO

from bayesmeta import config, registry, run
from bayesmeta.bounds import complexity, implied_beta, pac_bayes_bound
from bayesmeta.diagnostics.memorization import support_dependence
from bayesmeta.fit import fresh_adam
from bayesmeta.likelihoods import Gaussian
from bayesmeta.method import Method, no_guide
from bayesmeta.registry import build_method, make_family
from bayesmeta.sections import Section, bound
from bayesmeta.sites import SD_FLOOR, observe

BETA0 = 1e-9  # numpyro.handlers.scale needs a positive scale, so the baseline is a negligible beta
NME = ["task.family='nme_sinusoid'", "task.shots=5", "task.queries=6", "model.net.hidden=[8]"]


def _loss_fn(method, batch):
    svi = SVI(method.model, method.guide, optax.sgd(0.0), TraceMeanField_ELBO())
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))

    def loss(p):
        return TraceMeanField_ELBO().loss(jax.random.PRNGKey(7), p, method.model, method.guide, batch)

    return loss, params


def _method(name, *overrides):
    cfg = registry.load_config(None, [*NME, f"model.method='{name}'", *overrides])
    fam = make_family(cfg.task)
    return build_method(cfg.model, fam.x_dim, fam.y_dim), fam.sample(jax.random.PRNGKey(1), 3)


@pytest.mark.parametrize("beta", [1e-4, 0.3, 2.0])
def test_weight_kl_enters_the_loss_exactly_beta_times(beta):
    """SVI loss(beta) - loss(beta0) = (beta - beta0) KL(N(loc, sd^2) || N(0, 1)), KL computed by hand in
    numpy with the documented sd = SD_FLOOR + softplus(rho), at distinct rho per weight (so each loc is
    paired with its own rho); the data term is unchanged because the same key draws the same weights."""
    m0, batch = _method("mr_maml_w", f"model.params.beta={BETA0}", "model.params.rho_init=-2.0")
    mb, _ = _method("mr_maml_w", f"model.params.beta={beta}", "model.params.rho_init=-2.0")
    loss0, params = _loss_fn(m0, batch)
    lossb, _ = _loss_fn(mb, batch)
    rng = np.random.default_rng(0)
    params = {
        k: (jnp.asarray(rng.uniform(-3.0, 0.5, v.shape), v.dtype) if k.endswith(".rho") else v)
        for k, v in params.items()
    }
    kl, n_rho = 0.0, 0
    for name in params:
        if name.endswith(".loc"):
            loc = np.asarray(params[name], np.float64)
            rho = np.asarray(params[name[:-4] + ".rho"], np.float64)
            sd = SD_FLOOR + np.log1p(np.exp(rho))
            kl += np.sum(-np.log(sd) + (sd**2 + loc**2) / 2 - 0.5)
            n_rho += 1
    assert n_rho > 0 and kl > 100
    np.testing.assert_allclose(float(lossb(params)) - float(loss0(params)), (beta - BETA0) * kl, rtol=2e-4)
    np.testing.assert_allclose(float(mb.kl(params)), kl, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_bottleneck_kl_is_beta_times_the_mean_over_query_points(beta):
    """MR-MAML(A): loss(beta) - loss(beta0) = (beta - beta0) * mean over tasks and query points of
    KL(q(z|x*) || N(0, I))."""
    m0, batch = _method("mr_maml_a", f"model.params.beta={BETA0}")
    mb, _ = _method("mr_maml_a", f"model.params.beta={beta}")
    loss0, params = _loss_fn(m0, batch)
    lossb, _ = _loss_fn(mb, batch)
    from bayesmeta.nets import MLP

    enc = MLP(21, 10, (80,))
    theta = {layer: {k: params[f"encoder.{layer}.{k}"] for k in ("w", "b")} for layer in enc.layer_names}
    out = np.asarray(enc.apply(theta, batch.x_query), np.float64)
    mu, sd = out[..., :5], np.log1p(np.exp(out[..., 5:]))
    kl = np.mean(np.sum(-np.log(sd) + (sd**2 + mu**2) / 2 - 0.5, -1))
    np.testing.assert_allclose(float(lossb(params)) - float(loss0(params)), (beta - BETA0) * kl, rtol=1e-4)


def test_pac_bayes_bound_against_a_hand_computation():
    n, k, kl, delta, err = 15000, 10, 123.4, 0.05, 0.2
    rate = math.sqrt(1 / 18) + math.sqrt(1 / 29998)
    expected = err + rate * math.sqrt(kl + math.log(15000 * 11 / 0.05))
    errs = np.full(n, err)  # the Gibbs error of each of the n training tasks
    b = pac_bayes_bound(errs, kl, n, k, delta, clip=1.0, beta=5e-5)
    assert b.bound == pytest.approx(expected, rel=1e-12)
    assert b.empirical_tasks == n and b.empirical_error_se == 0.0 and b.beta == 5e-5
    assert b.complexity == pytest.approx(complexity(n, k, kl, delta), rel=1e-12)
    assert implied_beta(n, k, delta) == pytest.approx(rate / (2 * math.sqrt(math.log(165000 / 0.05))))
    assert 0.03 < implied_beta(n, k, delta) < 0.032
    assert pac_bayes_bound(errs, 2 * kl, n, k, delta, 1.0).bound > b.bound  # more KL, looser
    assert pac_bayes_bound(errs, kl, 10 * n, k, delta, 1.0).bound < b.bound  # more tasks, tighter
    assert b.vacuous  # 3.04 > 1 with K = 10 query points: vacuous; with K = 200 it is not
    assert not pac_bayes_bound(errs, kl, n, 200, delta, 1.0).vacuous
    sub = pac_bayes_bound(np.array([0.1, 0.3, 0.2, 0.4]), kl, n, k, delta, 1.0)  # 4 of n: an estimate
    assert sub.empirical_tasks == 4 and sub.empirical_error_se == pytest.approx(
        np.std([1, 3, 2, 4], ddof=1) / 20
    )
    with pytest.raises(ValueError, match="training tasks"):
        pac_bayes_bound(np.zeros(3), kl, 2, k, delta, 1.0)
    with pytest.raises(ValueError, match="K >= 2"):
        complexity(n, 1, kl, delta)


def test_beta_from_bound_uses_the_training_protocol():
    cfg = registry.load_config(
        None,
        [
            *NME,
            "model.method='mr_maml_w'",
            "model.params.beta_from_bound=true",
            "train.steps=3000",
            "train.meta_batch=5",
        ],
    )
    setup = run.Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(0), 2)
    loss, params = _loss_fn(setup.method, batch)  # the beta lives inside the model: read it off the loss
    base, _ = _method("mr_maml_w", f"model.params.beta={BETA0}")
    loss0, _ = _loss_fn(base, batch)
    beta = implied_beta(15000, 6, 0.05)
    kl = float(setup.method.kl(params))
    np.testing.assert_allclose(float(loss(params)) - float(loss0(params)), (beta - BETA0) * kl, rtol=2e-4)


def _oracle_and_memorizer(family):
    """Two hand-made methods with known meters: one reads the amplitude off the support set by least
    squares on sin(u) (D ~ 1), one reads it off the one-hot and ignores the support (D = 0)."""
    amps = family.amplitudes

    def oracle(batch, inner_steps=None, training=True):
        s = jnp.sin(batch.x_support[..., :1])
        a = jnp.sum(s * batch.y_support, (1, 2)) / jnp.sum(s * s, (1, 2))
        observe(dist_lik, a[:, None, None] * jnp.sin(batch.x_query[..., :1]), batch.y_query)

    def memorizer(batch, inner_steps=None, training=True):
        a = amps[jnp.argmax(batch.x_query[:, 0, 1:], -1)]
        observe(dist_lik, a[:, None, None] * jnp.sin(batch.x_query[..., :1]), batch.y_query)

    lik = Gaussian(0.1)
    return Method("oracle", oracle, no_guide, likelihood=lik), Method(
        "memorizer", memorizer, no_guide, likelihood=lik
    )


dist_lik = Gaussian(0.1)


def test_memorization_meter_reads_zero_for_a_memorizer_and_one_for_an_oracle():
    cfg = registry.load_config(
        None, ["task.family='nme_sinusoid'", "task.params.noise_sd=0.0", "task.shots=10"]
    )
    family = make_family(cfg.task)
    tasks = family.sample(jax.random.PRNGKey(0), 64)
    oracle, memorizer = _oracle_and_memorizer(family)
    m_oracle = support_dependence(oracle, {}, family, tasks, 0, jax.random.PRNGKey(1))
    m_mem = support_dependence(memorizer, {}, family, tasks, 0, jax.random.PRNGKey(1))
    assert m_mem["support_dependence"] == pytest.approx(0.0, abs=1e-12)
    assert m_mem["truth_slope"] == pytest.approx(0.0, abs=1e-12)
    assert m_oracle["support_dependence"] == pytest.approx(1.0, abs=1e-4)
    assert m_oracle["truth_slope"] == pytest.approx(1.0, abs=1e-4)


def test_the_truth_slope_separates_following_the_truth_from_following_noise():
    """A model whose predictions swing with the support set but not with its truth has D > 0 and a
    slope near 0; a stochastic memorizer's sampling noise is not support dependence (one key)."""
    cfg = registry.load_config(
        None, ["task.family='nme_sinusoid'", "task.params.noise_sd=0.0", "task.shots=10"]
    )
    family = make_family(cfg.task)
    tasks = family.sample(jax.random.PRNGKey(0), 64)
    amps = family.amplitudes

    def noise_follower(batch, inner_steps=None, training=True):
        wiggle = 3.0 * jnp.sin(100.0 * jnp.sum(batch.x_support[..., :1], (1, 2)))  # unrelated to g
        observe(dist_lik, wiggle[:, None, None] + 0 * batch.x_query[..., :1], batch.y_query)

    def noisy_memorizer(batch, inner_steps=None, training=True):
        a = amps[jnp.argmax(batch.x_query[:, 0, 1:], -1)]
        jitter = numpyro.sample("jitter", dist.Normal(0, 1).expand([a.shape[0], 1, 1]).to_event(3))
        observe(dist_lik, (a[:, None, None] + jitter) * jnp.sin(batch.x_query[..., :1]), batch.y_query)

    follower = support_dependence(
        Method("f", noise_follower, no_guide, likelihood=Gaussian(0.1)),
        {},
        family,
        tasks,
        0,
        jax.random.PRNGKey(1),
    )
    assert follower["support_dependence"] > 0.5 and abs(follower["truth_slope"]) < 0.2
    noisy = support_dependence(
        Method("m", noisy_memorizer, no_guide, predict_with_guide=False, likelihood=Gaussian(0.1)),
        {},
        family,
        tasks,
        0,
        jax.random.PRNGKey(1),
    )
    assert noisy["support_dependence"] == pytest.approx(0.0, abs=1e-10)


def test_fresh_adam_is_a_new_adams_first_step():
    g = {"a": jnp.array([3.0, -1e-3, 0.0])}
    p = {"a": jnp.zeros(3)}
    upd, _ = fresh_adam(0.01).update(g, fresh_adam(0.01).init(p), p)
    adam = optax.adam(0.01, eps=1e-7)
    upd_adam, _ = adam.update(g, adam.init(p), p)
    np.testing.assert_allclose(upd["a"], upd_adam["a"], rtol=1e-5, atol=1e-12)
    # a second step of a persistent Adam differs; a fresh one repeats the first
    upd2, _ = fresh_adam(0.01).update(g, fresh_adam(0.01).init(p), p)
    np.testing.assert_allclose(upd2["a"], upd["a"])


def test_fresh_adam_config_splits_by_parameter_prefix():
    from bayesmeta.fit import make_optimizer

    cfg = registry.load_config(None, ["train.fresh_adam='enc'", "train.lr=0.1"])
    opt = make_optimizer(cfg.train)
    params = {"enc.w": jnp.zeros(2), "head.w": jnp.zeros(2)}
    state = opt.init(params)
    g = {"enc.w": jnp.array([1e-3, 2.0]), "head.w": jnp.array([1e-3, 2.0])}
    for _ in range(3):
        upd, state = opt.update(g, state, params)
    np.testing.assert_allclose(upd["enc.w"], -0.1 * g["enc.w"] / (jnp.abs(g["enc.w"]) + 1e-7), rtol=1e-5)
    assert not np.allclose(upd["head.w"], upd["enc.w"])


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("mr_maml_w", []),
        ("mr_maml_a", []),
        ("cnp", ["model.noise_sd=0.1"]),
        ("mr_cnp_w", ["model.noise_sd=0.1"]),
        ("mr_cnp_a", ["model.noise_sd=0.1"]),
        ("mr_cnp_a", ["model.noise_sd=0.1", "model.params.bottleneck='query'"]),
    ],
)
def test_each_method_learns_and_writes_its_posterior(method, extra, tmp_path, small_cfg):
    """A short fit on the NME sinusoid lowers the training loss clearly; stochastic-weight methods
    store posterior draws, their variational parameters and the PAC-Bayes bound."""
    cfg = small_cfg(
        "task.family='nme_sinusoid'",
        f"model.method='{method}'",
        "train.steps=600",
        "train.meta_batch=4",
        "train.log_every=100",
        "train.eval_every=300",
        "train.checkpoint_every=300",
        "eval.samples=3",
        "eval.inner_steps=[5]",
        "eval.posterior_draws=7",
        "eval.bound_tasks=50",
        *extra,
    )
    result, metrics = run.train(cfg, tmp_path, progress=False)
    loss = np.asarray(result.trace.loss)
    assert loss[-100:].mean() < loss[:100].mean() - 0.1 * abs(loss[:100].mean())
    assert metrics["diagnostics"]["support_dependence@5"] >= 0
    assert np.isfinite(metrics["diagnostics"]["truth_slope@5"])
    with xr.open_datatree(tmp_path / "inference.nc", engine="h5netcdf") as dt:
        if method.endswith("_w"):
            prefix = "encoder" if method.startswith("mr_maml") else "xpath"
            draws = dt["posterior"][f"{prefix}_layer_0"]
            assert draws.shape[:2] == (1, 7) and draws.attrs["site"] == f"{prefix}.layer_0"
            if method == "mr_maml_w":  # the default posterior is random, far above the sd floor
                assert float(draws.std("draw").median()) > 100 * SD_FLOOR
                azp.plot_dist(dt, var_names=[f"{prefix}_layer_0"], coords={d: [0] for d in draws.dims[2:]})
            rho = dt["point_estimates"][f"{prefix}_layer_0_rho"]
            assert rho.dims == draws.dims[2:]  # the variational parameters on the kernel's own dims
            assert not set(dt["point_estimates"].data_vars) & set(dt["posterior"].data_vars)
            assert "## Posterior of the stochastic meta-parameters" in (tmp_path / "summary.md").read_text()
            assert (tmp_path / "posterior_summary.csv").read_text().startswith(",mean,sd")
            b = metrics["pac_bayes"]
            (cached,) = (tmp_path / "cache").glob("pac_bayes-*.json")  # kept for later evaluations
            assert json.loads(cached.read_text()) == b
            assert float(dt["pac_bayes"]["bound"]) == pytest.approx(b["bound"])
            assert dt["pac_bayes"]["bound"].attrs["delta"] == b["delta"]
            assert dt["pac_bayes"]["bound"].attrs["vacuous"] == str(b["vacuous"]).lower()
            assert b["bound"] > b["empirical_error"] >= 0 and b["n"] == 600 * 4
            assert b["empirical_tasks"] == 48 and b["empirical_error_se"] > 0  # 12 of the 600 steps' tasks
            assert b["beta"] == registry.load_config(None, [f"model.method='{method}'"]).model.params.get(
                "beta", b["beta"]
            )
            assert json.loads(dt["pac_bayes"].attrs["vacuous"]) == b["vacuous"] == (b["bound"] > 1)
            summary = (tmp_path / "summary.md").read_text()
            assert ("**vacuous**" in summary) == b["vacuous"] and "training tasks the fit saw" in summary
        else:
            assert metrics["pac_bayes"] is None and "pac_bayes" not in dt.children


def test_the_bound_is_computed_on_the_tasks_the_fit_saw(small_cfg):
    """The empirical term is the Gibbs error on the training tasks regenerated from the step keys: the
    same number as a hand computation over fit.step_tasks of every step (all n tasks, no estimate)."""
    from bayesmeta.bounds import clipped_squared_error
    from bayesmeta.fit import fit, run_keys, step_tasks
    from bayesmeta.predict import predictive

    cfg = small_cfg(
        "task.family='nme_sinusoid'",
        "model.method='mr_maml_w'",
        "train.steps=6",
        "train.meta_batch=3",
        "train.log_every=3",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "eval.samples=2",
        "seed=3",
    )
    setup = run.Setup.from_config(cfg)
    svi_params = fit(setup.method, setup.family, cfg.train, seed=3, progress=False).params
    b = bound(setup, svi_params)
    assert b.empirical_tasks == b.n == 18 and b.empirical_error_se == 0.0
    _, key = run_keys(3)
    tasks = [step_tasks(setup.family, key, s, 3) for s in range(6)]  # eval.batch 20: one chunk of 6 steps
    tasks = jax.tree.map(lambda *a: jnp.concatenate(a), *tasks)
    f = predictive(setup.method, cfg.model.inner_steps, 2, ("f",))(
        svi_params, tasks, jax.random.fold_in(jax.random.PRNGKey(5), 0)
    )["f"]
    expected = float(jnp.mean(clipped_squared_error(f, tasks.y_query[None], 1.0)))
    assert b.empirical_error == pytest.approx(expected, rel=1e-5)
    fresh = setup.family.sample(jax.random.PRNGKey(99), 18)  # other tasks give another error
    f = predictive(setup.method, cfg.model.inner_steps, 2, ("f",))(
        svi_params, fresh, jax.random.fold_in(jax.random.PRNGKey(5), 0)
    )["f"]
    assert float(jnp.mean(clipped_squared_error(f, fresh.y_query[None], 1.0))) != pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.parametrize(("where", "points"), [("support", 5), ("query", 6)])
def test_mr_cnp_a_bottleneck_carries_the_kl_on_the_chosen_inputs(where, points):
    """The reference notebook's MR-CNP(A) regularises the support codes; Yin et al.'s eq. 2 the query
    inputs': the latent site w (whose KL the ELBO weights by beta) lives on those points."""
    from numpyro import handlers

    cfg = registry.load_config(None, [*NME, "model.method='mr_cnp_a'", f"model.params.bottleneck='{where}'"])
    family = make_family(cfg.task)
    method = run.Setup.from_config(cfg).method
    batch = family.sample(jax.random.PRNGKey(0), 3)
    tr = handlers.trace(handlers.seed(method.guide, 0)).get_trace(batch)
    assert tr["w"]["value"].shape == (3, points, 5)
    with pytest.raises(config.ConfigError, match=r"model\.params\.bottleneck"):
        registry.load_config(None, [*NME, "model.method='mr_cnp_w'", "model.params.bottleneck='query'"])


class _Counting(Section):
    """A fit-level section that counts its computations."""

    key = "counting"
    fit_level = ("eval.bound_tasks",)
    calls = 0

    def compute(self, run):
        _Counting.calls += 1
        return {"value": float(np.sum(run.params["w"])), "computed": _Counting.calls}

    def dump(self, result):
        return dict(result)

    def load(self, entry):
        return dict(entry)


def test_a_fit_level_result_is_computed_once_per_parameters_and_settings_it_reads(tmp_path):
    """_cached: the same parameters and read settings load the stored result (another unread setting
    too); other parameters, another read setting or an unreadable entry compute it anew."""
    from types import SimpleNamespace

    from bayesmeta.sections import _cached

    def run_at(w, *overrides):
        cfg = registry.load_config(None, list(overrides))
        return SimpleNamespace(setup=SimpleNamespace(cfg=cfg), params={"w": np.asarray(w, np.float32)})

    _Counting.calls = 0  # the count starts here, however often the test runs in one process
    section, cache = _Counting(), tmp_path / "cache"
    first = _cached(section, run_at([1.0, 2.0]), cache)
    assert first == {"value": 3.0, "computed": 1}
    assert _cached(section, run_at([1.0, 2.0], "eval.tasks=7"), cache) == first
    assert _cached(section, run_at([1.0, 2.5]), cache)["computed"] == 2
    assert _cached(section, run_at([1.0, 2.0], "eval.bound_tasks=99"), cache)["computed"] == 3
    assert len(list(cache.glob("counting-*.json"))) == 3
    for entry in cache.glob("counting-*.json"):
        entry.write_text("{not json")
    assert _cached(section, run_at([1.0, 2.0]), cache) == {"value": 3.0, "computed": 4}
    assert _cached(section, run_at([1.0, 2.0]), cache)["computed"] == 4
