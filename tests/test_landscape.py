"""Landscape and conflict diagnostics on cases with known answers (METHODS 5 and 6)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from bayesmeta import run
from bayesmeta.cli import main
from bayesmeta.config import ConfigError
from bayesmeta.diagnostics.conflict import conflict_per_layer, degree_of_conflict
from bayesmeta.diagnostics.landscape import (
    flatness,
    gradient_coherence,
    hvp,
    landscape_metrics,
    representation_coherence,
    top_eigenvalue,
    trajectory_coherence,
)
from bayesmeta.fit import Trace, initial_state, make_svi

KEY = jax.random.PRNGKey(0)


def quadratic(a: jax.Array):
    """0.5 x^T A x over a pytree {"u": x[:2], "v": x[2:]}: its Hessian is A everywhere."""

    def loss(p):
        x = jnp.concatenate([p["u"], p["v"]])
        return 0.5 * x @ a @ x

    return loss


def test_hvp_is_the_hessian_times_v():
    a = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]])
    p = {"u": jnp.ones(2), "v": jnp.ones(1)}
    out = hvp(quadratic(a), p, {"u": jnp.array([1.0, 0.0]), "v": jnp.array([2.0])})
    np.testing.assert_allclose(jnp.concatenate([out["u"], out["v"]]), a @ jnp.array([1.0, 0.0, 2.0]), 1e-6)


def test_top_eigenvalue_of_diagonal_and_rotated_quadratics():
    p = {"u": jnp.zeros(2), "v": jnp.zeros(2)}
    diag = jnp.diag(jnp.array([0.5, 7.0, -2.0, 3.0]))
    assert abs(float(top_eigenvalue(quadratic(diag), p, KEY, 50)) - 7.0) < 1e-4
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (4, 4)))
    a = q @ jnp.diag(jnp.array([1.0, 2.0, 4.0, 10.0])) @ q.T  # non-diagonal, eigenvalues known
    assert abs(float(top_eigenvalue(quadratic(a), p, KEY, 50)) - 10.0) < 1e-3


def test_flatness_averages_over_tasks():
    """Per-task loss s_i * ||p||^2 / 2 * x: Hessian s_i I, so flatness = mean s_i."""

    def loss(p, x, y):
        return 0.5 * x[0] * jnp.sum(p["w"] ** 2) + 0 * y[0]

    scales = jnp.array([[1.0], [3.0], [8.0]])
    phi = {"w": jnp.ones((3, 5))}
    assert abs(float(flatness(loss, phi, scales, scales, KEY, 30)) - 4.0) < 1e-4


def test_trajectory_coherence_identical_orthogonal_opposite():
    theta = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}

    def phis(*dirs):
        d = jnp.array(dirs)
        return {"a": theta["a"] + d[:, :2], "b": theta["b"] + d[:, 2:]}

    assert abs(float(trajectory_coherence(theta, phis([1, 2, 3], [2, 4, 6], [0.1, 0.2, 0.3]))) - 1) < 1e-6
    assert abs(float(trajectory_coherence(theta, phis([1, 0, 0], [0, 3, 0], [0, 0, 2])))) < 1e-7
    assert abs(float(trajectory_coherence(theta, phis([1, -1, 2], [-2, 2, -4]))) + 1) < 1e-6


def test_gradient_coherence_by_hand():
    g = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0], [0.0, 2.0]]), "b": jnp.array([[1.0], [0.0], [-1.0]])}
    # flat g: (1,2,1), (3,-1,0), (0,2,-1); pair products 1, 3, -2 (x2 each, ordered pairs)
    expected = (1.0 + 3.0 - 2.0) * 2 / 6
    assert abs(float(gradient_coherence(g)) - expected) < 1e-6


def test_representation_coherence_is_a_cosine():
    h = jnp.array([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0]])  # cosines 1, 0, 0 -> mean over ordered pairs 1/3
    assert abs(float(representation_coherence(h)) - 1 / 3) < 1e-6


def test_conflict_identical_opposing_and_known_angle():
    same = {"w": jnp.tile(jnp.array([[1.0, -2.0, 0.5]]), (4, 1))}
    assert abs(float(degree_of_conflict(same))) < 1e-3  # arccos near 1 is float-limited (~sqrt(eps))
    opposing = {"w": jnp.array([[1.0, 2.0], [-1.0, -2.0]])}
    assert abs(float(degree_of_conflict(opposing)) - np.pi / 2) < 1e-6
    eps = 1e-3  # (1, eps) and (-1, eps): v = (0, 1), each at arccos(eps / sqrt(1 + eps^2))
    near = {"w": jnp.array([[1.0, eps], [-1.0, eps]])}
    assert abs(float(degree_of_conflict(near)) - np.arccos(eps / np.sqrt(1 + eps**2))) < 1e-5
    layers = conflict_per_layer({"a": same, "b": opposing})
    assert set(layers) == {"a", "b"} and abs(float(layers["b"]) - np.pi / 2) < 1e-6


def test_fit_with_diagnostics_writes_them_to_the_run(small_cfg, tmp_path):
    cfg = small_cfg(
        "train.steps=100",
        "train.log_every=25",
        "train.eval_every=50",
        "train.checkpoint_every=50",
        "eval.tasks=20",
        "eval.plot_tasks=0",
        "train.diagnostics_every=25",
        "train.diagnostics_tasks=4",
        "train.diagnostics_power_iterations=5",
        "model.net.hidden=[8]",
        "eval.inner_steps=[1]",
        "eval.memorization_tasks=0",
    )
    result, _ = run.train(cfg, tmp_path / "r", progress=False)
    assert result.trace.diagnostics_step == [25, 50, 75, 100]
    names = {"flatness", "trajectory_coherence", "gradient_coherence", "representation_coherence"}
    names |= {"conflict_layer_0", "conflict_head"}
    stats = xr.open_datatree(tmp_path / "r" / "inference.nc")["sample_stats"].to_dataset()
    assert stats["diagnostics_step"].values.tolist() == [25, 50, 75, 100]
    for k in names | {"test_mse@1"}:
        assert np.all(np.isfinite(stats[f"diag_{k}"].values)), k
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    history = metrics["history"]["mse@1"]  # the held-out metric during training, by step
    assert list(history) == ["50", "100"] and history["100"] == result.trace.eval["mse@1"][-1]
    saved = metrics["landscape"]
    assert saved["step"] == [25, 50, 75, 100] and saved["test_metric"] == "mse@1"
    assert set(saved["correlation"]) == names
    r = saved["correlation"]["gradient_coherence"]
    expected = np.corrcoef(saved["values"]["gradient_coherence"], saved["values"]["test_mse@1"])[0, 1]
    assert abs(r - expected) < 1e-9
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "## Landscape diagnostics" in summary and f"| gradient_coherence | {r:.3f} |" in summary
    assert (tmp_path / "r" / "plots" / "landscape.png").is_file()


def test_diagnostics_need_a_probe(small_cfg, tmp_path, capsys):
    cfg = small_cfg("model.method=cnp", "train.diagnostics_every=50")
    with pytest.raises(ConfigError, match=r"^train\.diagnostics_every: .*'cnp'"):
        run.Setup.from_config(cfg)
    args = ["fit", "--run-dir", str(tmp_path / "r"), "--no-progress", "--set", "model.method=cnp"]
    assert main([*args, "--set", "train.diagnostics_every=100"]) == 2
    assert "config error: train.diagnostics_every: method 'cnp' has no probe" in capsys.readouterr().err


def test_diagnostics_every_is_a_multiple_of_log_every(small_cfg):
    with pytest.raises(ConfigError, match=r"^train\.diagnostics_every: expected a multiple"):
        small_cfg("train.diagnostics_every=70")


def test_trace_keeps_diagnostics_through_a_checkpoint():
    trace = Trace(loss=[1.0, 0.5])
    trace.add_diagnostics(2, {"flatness": 3.0, "test_mse@1": 0.2})
    back = Trace.from_arrays(np.asarray(trace.loss), trace.to_json())
    assert back.diagnostics_step == [2] and back.diagnostics == {"flatness": [3.0], "test_mse@1": [0.2]}
    old = json.dumps({"eval_step": [], "eval": {}, "seconds": 0.0})  # a checkpoint from before
    assert Trace.from_arrays(np.zeros(1), old).diagnostics == {}


RATES = ("model.params.learned_lr='per_layer_step'", "model.params.lr_init=0.05")


@pytest.mark.parametrize(
    "method, extra",
    [
        ("maml", ()),
        ("fomaml", ()),
        ("maml", RATES),  # the probe adapts with the learned rates, not model.inner_lr
        ("l2f", ()),  # and with L2F's task-conditioned attenuation of theta
        ("l2f", RATES),
        ("mr_maml_w", ("task.family='nme_sinusoid'",)),
    ],
)
def test_probe_matches_the_model_and_gives_finite_metrics(small_cfg, method, extra):
    """The probe's adaptation is the model's: the mean query loss at the probe's adapted phi is the SVI
    loss minus the Gaussian constant log(sqrt(pi)) (sd sqrt(1/2)), at parameters moved off their
    initial values; every method's metrics are finite there."""
    cfg = small_cfg(f"model.method={method}", "model.inner_steps=2", "model.net.hidden=[8, 8]", *extra)
    setup = run.Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    state, _ = initial_state(svi, setup.family, cfg.train, 0)
    keys = jax.random.split(jax.random.PRNGKey(3), len(svi.get_params(state)))
    params = {  # every parameter perturbed, so learned rates and gamma differ from their initial values
        k: v + 0.01 * jax.random.normal(kk, jnp.shape(v))
        for kk, (k, v) in zip(keys, svi.get_params(state).items(), strict=True)
    }
    batch = setup.family.sample(jax.random.PRNGKey(5), 6)
    probe = setup.method.probe(params)
    if method != "mr_maml_w":
        phi = probe.adapt(probe.theta, batch.x_support, batch.y_support)
        mean_query = jnp.mean(jax.vmap(probe.query_loss)(phi, batch.x_query, batch.y_query))
        elbo = svi.loss.loss(KEY, params, svi.model, svi.guide, batch)
        np.testing.assert_allclose(mean_query + 0.5 * np.log(np.pi), elbo, rtol=1e-5)
    out = jax.jit(lambda p: landscape_metrics(setup.method.probe(p), batch, KEY, 5))(params)
    assert all(bool(jnp.isfinite(v)) for v in out.values()), out


def test_landscape_summary_writes_null_for_non_finite_values():
    """A diverged held-out task (inf) must not make metrics.json invalid JSON."""
    import json

    from bayesmeta.sections import landscape_summary

    out = landscape_summary(
        [1, 2, 3], {"flatness": [1.0, float("inf"), 2.0], "test_mse@1": [3.0, 2.0, 1.0]}
    ).dump()
    assert out["values"]["flatness"] == [1.0, None, 2.0] and out["final"]["flatness"] == 2.0
    assert out["correlation"]["flatness"] is None
    json.dumps(out, allow_nan=False)
