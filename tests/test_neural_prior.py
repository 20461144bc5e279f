"""The neural prior's exact reference: NUTS against Bayesian linear regression's closed form, the inner
ELBO's analytic KL and its weight in the meta-objective, and a short meta-training that learns the prior."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import TraceMeanField_ELBO

from bayesmeta import registry
from bayesmeta.fit import fit
from bayesmeta.models.neural_prior import NUTS_SITES, gaussian_kl
from bayesmeta.predict import predictive

SD = 0.5  # observation noise sd
MU, PRIOR_SD = np.array([0.5, -0.3]), np.array([0.8, 1.2])  # prior of (slope, intercept)
LINEAR = [
    "model.method='neural_prior'",
    "model.net.hidden=[]",  # f(x; w) = w x + b: Bayesian linear regression on (x, 1)
    f"model.noise_sd={SD}",
    "task.shots=5",
    "task.queries=4",
]


def _linear(*extra):
    cfg = registry.load_config(None, [*LINEAR, *extra])
    fam = registry.make_family(cfg.task)
    return fam, registry.build_method(cfg.model, 1, 1)


def _prior_params():
    return {
        "prior_mu.head.w": jnp.full((1, 1), MU[0]),
        "prior_mu.head.b": jnp.full((1,), MU[1]),
        "prior_log_sd.head.w": jnp.full((1, 1), np.log(PRIOR_SD[0])),
        "prior_log_sd.head.b": jnp.full((1,), np.log(PRIOR_SD[1])),
    }


def _sample(fam, seed, n):
    """fam.sample in one compiled program (eagerly, each operation compiles on its own)."""
    return jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(seed), n)


@jax.jit
def _exact(batch):
    """Bishop (2006) 3.3 on features (x, 1): the posterior predictive mean and variance of f at x*."""
    phi_s = jnp.concatenate([batch.x_support, jnp.ones_like(batch.x_support)], -1)
    phi_q = jnp.concatenate([batch.x_query, jnp.ones_like(batch.x_query)], -1)
    prec0 = jnp.diag(1 / jnp.asarray(PRIOR_SD) ** 2)
    cov = jnp.linalg.inv(prec0 + jnp.einsum("tnk,tnl->tkl", phi_s, phi_s) / SD**2)
    rhs = prec0 @ jnp.asarray(MU) + jnp.einsum("tnk,tn->tk", phi_s, batch.y_support[..., 0]) / SD**2
    mean_w = jnp.einsum("tkl,tl->tk", cov, rhs)
    return jnp.einsum("tnk,tk->tn", phi_q, mean_w), jnp.einsum("tnk,tkl,tnl->tn", phi_q, cov, phi_q)


def test_nuts_matches_the_closed_form_predictive_of_bayesian_linear_regression():
    """NUTS draws under a hand-set prior give the exact posterior predictive of f at the query inputs
    within Monte Carlo error: with n_eff the effective draws (ArviZ/Stan ESS over the 4 chains), the
    mean's error sd is sqrt(v / n_eff) and the sample variance's v sqrt(2 / n_eff) (f is Gaussian); we
    allow 4.5 of them (12 points each: a false alarm below 1e-4). Test-time steps 0 draw the prior
    itself; the "vi" path predicts with the amortized q after its inner steps."""
    fam, method = _linear("model.params.chains=4", "model.params.warmup=300")
    batch = _sample(fam, 0, 3)
    n, c = 2000, 4
    out = predictive(method, 1, n, ("f", "y", *NUTS_SITES))(_prior_params(), batch, jax.random.PRNGKey(1))
    f = np.asarray(out["f"][..., 0])  # (S, T, Q), draws chain after chain
    mean, var = (np.asarray(a) for a in _exact(batch))
    n_eff = effective_sample_size(f.reshape(c, n // c, *f.shape[1:]))
    assert n_eff.min() > 300, n_eff.min()
    np.testing.assert_array_less(np.abs(f.mean(0) - mean), 4.5 * np.sqrt(var / n_eff))
    np.testing.assert_array_less(np.abs(f.var(0) - var), 4.5 * var * np.sqrt(2 / n_eff))
    y_var = np.asarray(out["y"][..., 0]).var(0)  # y* = f* + noise
    np.testing.assert_array_less(np.abs(y_var - var - SD**2), 4.5 * (var + SD**2) * np.sqrt(2 / n_eff))
    assert int(out["nuts_diverging"].sum()) == 0  # a 2-d Gaussian posterior: no divergences
    assert 0.6 < float(out["nuts_accept_prob"].mean()) < 1.0
    assert out["nuts_num_steps"].shape == (n, 3) and int(out["nuts_num_steps"].min()) >= 1

    # no steps: the prior predictive, f* = mu_w x* + mu_b exactly in mean
    prior = predictive(method, 0, n, ("f",))(_prior_params(), batch, jax.random.PRNGKey(2))["f"][..., 0]
    x = np.asarray(batch.x_query[..., 0])
    prior_var = PRIOR_SD[0] ** 2 * x**2 + PRIOR_SD[1] ** 2
    np.testing.assert_array_less(np.abs(prior.mean(0) - (MU[0] * x + MU[1])), 4.5 * np.sqrt(prior_var / n))

    # the amortized q after 100 inner steps is near the exact posterior mean (mean-field VI on a
    # Gaussian posterior gets its mean right; SGD noise remains), far nearer than the prior
    _, vi = _linear("model.params.inference='vi'", "model.inner_lr=0.03")
    assert vi.sampler is None  # Predictive over model and guide
    q = predictive(vi, 100, 50, ("f",))(_prior_params(), batch, jax.random.PRNGKey(3))["f"][..., 0]
    assert q.shape == (50, 3, 4)
    assert np.mean(np.abs(q.mean(0) - mean)) < 0.1 * np.mean(np.abs(prior.mean(0) - mean))


def test_kl_is_the_analytic_gaussian_kl_weighted_one_per_task():
    """gaussian_kl equals numpyro's KL of the diagonal Gaussians; the meta-loss is the mean query NLL
    under draws of q_i plus lambda mean_i KL(q_i || p), unset lambda = 1/K for K = 4 query points (so
    K x loss is the per-task negative ELBO), with q_i and its draws read from the guide's trace. With
    outer_data = "all" the NLL is over the N + K = 9 support and query points and lambda = 1/9. (An
    explicit model.params.kl_weight replaces lambda; it is passed through unchanged.)"""
    shapes = {"a": {"w": (3, 2), "b": (2,)}, "head": {"w": (2, 1), "b": (1,)}}
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    key, params = jax.random.PRNGKey(3), _prior_params()
    fam, method = _linear("model.inner_steps=3", "model.inner_lr=0.03")
    _, on_all = _linear("model.inner_steps=3", "model.inner_lr=0.03", "model.params.outer_data='all'")
    batch = _sample(fam, 0, 3)
    guide_key = jax.random.split(key)[1]  # TraceMeanField_ELBO seeds the guide with this half

    def rand(k, s=1.0):
        ks = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(
            tree, [s * jax.random.normal(kk, sh) for kk, sh in zip(ks, leaves, strict=True)]
        )

    def normal(g):
        return dist.Normal(ravel_pytree(g["loc"])[0], jnp.exp(ravel_pytree(g["log_sd"])[0])).to_event(1)

    @jax.jit  # one program: eager operations would each compile on their own
    def terms(prm):
        keys = jax.random.split(jax.random.PRNGKey(7), 4)
        q = {"loc": rand(keys[0]), "log_sd": rand(keys[1], 0.5)}
        p = {"loc": rand(keys[2]), "log_sd": rand(keys[3], 0.5)}
        kls = gaussian_kl(q, p), dist.kl_divergence(normal(q), normal(p))

        loss, loss_all = (
            TraceMeanField_ELBO().loss(key, prm, m.model, m.guide, batch) for m in (method, on_all)
        )
        tr = handlers.trace(handlers.substitute(handlers.seed(method.guide, guide_key), prm)).get_trace(batch)
        kl = 0.0
        for leaf in ("w", "b"):
            q_i = tr[f"w.head.{leaf}"]["fn"]  # (T,) Gaussians over the leaf
            prior = dist.Normal(prm[f"prior_mu.head.{leaf}"], jnp.exp(prm[f"prior_log_sd.head.{leaf}"]))
            kl = kl + dist.kl_divergence(q_i, prior.to_event(q_i.event_dim))
        w, b = tr["w.head.w"]["value"], tr["w.head.b"]["value"]  # the draws the loss used

        def nll(x, y):
            return -jnp.mean(dist.Normal(jnp.einsum("tnd,tde->tne", x, w) + b[:, None, :], SD).log_prob(y))

        both = [
            jnp.concatenate([s, q], 1)
            for s, q in ((batch.x_support, batch.x_query), (batch.y_support, batch.y_query))
        ]
        return kls, (loss, loss_all), (nll(batch.x_query, batch.y_query), nll(*both)), kl

    (mine, numpyros), (loss, loss_all), (nll, nll_all), kl = terms(params)
    np.testing.assert_allclose(mine, numpyros, rtol=1e-5)
    assert float(numpyros) > 1.0
    assert kl.shape == (3,) and float(jnp.min(kl)) > 0.1  # the inner loop moved every q_i from the prior
    np.testing.assert_allclose(float(loss), float(nll + jnp.mean(kl) / 4), rtol=1e-5)
    np.testing.assert_allclose(float(loss_all), float(nll_all + jnp.mean(kl) / 9), rtol=1e-5)


def test_meta_training_learns_the_prior_of_a_linear_family():
    """On lines y = a + b x + noise with a ~ N(0.5, 1), b ~ N(1, 0.3^2) (the basis family without its
    sine and cosine), a linear net's learned prior moves its mean from (glorot draw, 0) to (b, a) =
    (1, 0.5) and its sds apart from 0.135 both: the intercept's (true 1) well above the slope's (0.3)."""
    cfg = registry.load_config(
        None,
        [
            *LINEAR,
            "task.family='basis_regression'",
            "task.params.prior_mean=[0.5, 1.0, 0.0, 0.0]",
            "task.params.prior_sd=[1.0, 0.3, 0.0, 0.0]",
            "task.params.x_range=[-2.0, 2.0]",
            "task.params.noise_sd=0.3",
            "model.noise_sd=0.3",
            "model.inner_steps=10",
            "model.inner_lr=0.2",
            "train.steps=150",
            "train.meta_batch=16",
            "train.lr=0.04",
            "train.log_every=150",
            "train.eval_every=150",
            "train.checkpoint_every=150",
        ],
    )
    fam = registry.make_family(cfg.task)
    params = fit(registry.build_method(cfg.model, 1, 1), fam, cfg.train, seed=0, progress=False).params
    mu = np.array([params["prior_mu.head.w"][0, 0], params["prior_mu.head.b"][0]])
    sd = np.exp([params["prior_log_sd.head.w"][0, 0], params["prior_log_sd.head.b"][0]])
    np.testing.assert_allclose(mu, [1.0, 0.5], atol=0.1)  # the bias starts at 0, 0.5 away
    assert sd[1] > 3 * np.exp(-2.0) and sd[1] > 3 * sd[0], sd
