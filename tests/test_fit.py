"""The SVI driver: it learns, resumes exactly, and stops cleanly on NaN, interrupts and bad checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bayesmeta import registry, run
from bayesmeta.cli import main
from bayesmeta.fit import CHECKPOINT, CheckpointError, fit, learning_rate, make_optimizer
from bayesmeta.predict import eval_tasks, evaluate, predictive, quick_metric


def test_short_fit_beats_the_best_constant_predictor(small_cfg, tmp_path):
    """After 1500 steps MAML's 10-step test MSE is far below predicting each task's support mean."""
    cfg = small_cfg(
        "train.steps=1500",
        "train.meta_batch=25",
        "model.net.hidden=[40, 40]",
        "train.log_every=100",
        "train.eval_every=500",
        "train.checkpoint_every=500",
    )
    setup = run.Setup.from_config(cfg)
    result = fit(setup.method, setup.family, cfg.train, seed=0, progress=False)
    batches = eval_tasks(setup.eval_family, jax.random.PRNGKey(99), 200, 100)
    ev = evaluate(setup.method, setup.likelihood, result.params, batches, (0, 10), 1, jax.random.PRNGKey(0))
    tasks = ev.tasks
    const = np.mean((tasks.y_query - tasks.y_support.mean(1, keepdims=True)) ** 2, axis=(1, 2))
    mse10 = ev.per_task[10]["mse"]
    assert mse10.mean() < 0.3 * const.mean(), (mse10.mean(), const.mean())
    assert mse10.mean() < ev.per_task[0]["mse"].mean()  # adaptation helps
    loss = np.asarray(result.trace.loss)
    assert loss[-100:].mean() < 0.5 * loss[:100].mean()


def test_training_monitor_in_chunks_equals_all_at_once(small_cfg):
    """The monitor averages its per-task metrics over eval.batch-sized chunks (memory bounded by the
    chunk): the same number as one call on all the tasks, also with a last, smaller chunk."""
    setup = run.Setup.from_config(small_cfg())
    tasks = setup.eval_family.sample(jax.random.PRNGKey(5), 10)
    params = fit(setup.method, setup.family, small_cfg("train.steps=5").train, seed=0, progress=False).params
    whole = quick_metric(setup.eval_method, setup.likelihood, tasks, 2)(params)
    for chunk in (5, 4):
        parts = quick_metric(setup.eval_method, setup.likelihood, tasks, 2, chunk)(params)
        assert parts.keys() == whole.keys() == {"mse@2"}
        np.testing.assert_allclose(parts["mse@2"], whole["mse@2"], rtol=1e-5)


def test_resume_ends_in_the_same_parameters(small_cfg, tmp_path):
    cfg = small_cfg()
    full, _ = run.train(cfg, tmp_path / "full", progress=False)
    part, metrics = run.train(cfg, tmp_path / "split", until=100, progress=False)
    assert part.step == 100 and metrics is None
    assert not (tmp_path / "split" / "metrics.json").exists()
    resumed, metrics = run.train(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 200 and metrics is not None
    for k in full.params:
        np.testing.assert_array_equal(full.params[k], resumed.params[k])
    np.testing.assert_array_equal(full.trace.loss, resumed.trace.loss)
    assert full.trace.eval_step == resumed.trace.eval_step == [100, 200]


def interrupted_fit(setup, cfg, run_dir, evaluate) -> None:
    """fit until `evaluate` (called at the first evaluation) interrupts it: KeyboardInterrupt expected."""
    with pytest.raises(KeyboardInterrupt):
        fit(setup.method, setup.family, cfg.train, seed=0, run_dir=run_dir, evaluate=evaluate, progress=False)


def test_keyboard_interrupt_checkpoints_and_resume_matches(small_cfg, tmp_path):
    cfg = small_cfg("train.checkpoint_every=200")
    setup = run.Setup.from_config(cfg)
    calls = []

    def interrupt(params):
        calls.append(1)
        raise KeyboardInterrupt

    interrupted_fit(setup, cfg, tmp_path / "a", interrupt)
    assert calls and (tmp_path / "a" / CHECKPOINT).is_file()
    _, checkpointed = run.restore(cfg, tmp_path / "a")
    assert checkpointed.step == 100  # the interrupt came at the first evaluation, before the first checkpoint
    resumed = fit(
        setup.method, setup.family, cfg.train, seed=0, run_dir=tmp_path / "a", resume=True, progress=False
    )
    full = fit(setup.method, setup.family, cfg.train, seed=0, progress=False)
    for k in full.params:
        np.testing.assert_array_equal(full.params[k], resumed.params[k])


def test_sigterm_checkpoints_the_current_step_like_ctrl_c(small_cfg, tmp_path):
    """A stop by SIGTERM (a scheduler's, a machine's) during training checkpoints the step it came at,
    and the default handler is back afterwards."""
    cfg = small_cfg("train.checkpoint_every=200")
    setup = run.Setup.from_config(cfg)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a plain process (not a test worker's)
    try:
        interrupted_fit(setup, cfg, tmp_path / "a", lambda params: os.kill(os.getpid(), signal.SIGTERM) or {})
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run.restore(cfg, tmp_path / "a")[1].step == 100  # the first evaluation's step


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(small_cfg, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = small_cfg("train.steps=100")
    good, _ = run.train(cfg, run_dir, progress=False)
    # continue with an absurd learning rate: Adam moves every weight by ~1e30 and the loss overflows
    code = main(
        [
            "fit",
            "--resume",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--set",
            "train.steps=200",
            "--set",
            "train.lr=1e30",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    # --no-progress logs bayesmeta's lines at INFO, not JAX's INFO lines about backends it probed
    assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() >= logging.WARNING
    m = re.search(r"non-finite loss or parameters at step (\d+); last good state \(step 100\) kept", err)
    assert m and 100 < int(m.group(1)) <= 110, err
    _, kept = run.restore(cfg, run_dir)
    params = kept.params
    assert kept.step == 100
    for k in good.params:
        np.testing.assert_array_equal(params[k], good.params[k])
        assert jnp.all(jnp.isfinite(params[k]))


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(small_cfg, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = small_cfg("train.steps=100")
    run.train(cfg, run_dir, progress=False)
    # a different network cannot load this checkpoint
    code = main(["fit", "--resume", "--run-dir", str(run_dir), "--set", "model.net.hidden=[7]"])
    assert code == 1
    assert "does not match the configured model" in capsys.readouterr().err
    (run_dir / CHECKPOINT).write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="is unreadable"):
        run.restore(cfg, run_dir)
    (run_dir / CHECKPOINT).unlink()
    assert main(["evaluate", str(run_dir)]) == 1
    assert "has no checkpoint (checkpoint/state.npz): it was never trained" in capsys.readouterr().err


def test_fit_refuses_to_overwrite_a_run(small_cfg, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run.train(
        small_cfg("train.steps=50", "train.log_every=50", "train.eval_every=50", "train.checkpoint_every=50"),
        run_dir,
        progress=False,
    )
    before = (run_dir / CHECKPOINT).read_bytes()
    assert main(["fit", "--run-dir", str(run_dir), "--set", "train.steps=50"]) == 2
    assert "already holds a run (config.toml exists)" in capsys.readouterr().err
    assert (run_dir / CHECKPOINT).read_bytes() == before


def test_maml_learns_its_output_noise(small_cfg):
    """MAML with model.noise = "learned": the observation sd is a meta-parameter fitted by SVI; started
    far too large (3.0) on tasks whose noise sd is 0.3, it falls."""
    cfg = small_cfg(
        "task.family='sine_line'",
        "task.shots=5",
        "model.noise='learned'",
        "model.noise_sd=3.0",
        "model.inner_steps=2",
        "train.steps=400",
        "train.lr=0.01",
    )
    setup = run.Setup.from_config(cfg)
    result = fit(setup.method, setup.family, cfg.train, seed=0, progress=False)
    noise = float(result.params["noise_sd"])
    # the sd's maximum-likelihood value is the RMS residual of the adapted predictions
    tasks = setup.family.sample(jax.random.PRNGKey(5), 200)
    f = predictive(setup.method, 2, 1, ("f",))(result.params, tasks, jax.random.PRNGKey(0))["f"][0]
    rms = float(jnp.sqrt(jnp.mean(jnp.square(f - tasks.y_query))))
    assert noise < 2.5 and noise == pytest.approx(rms, rel=0.25)


def test_seeds_trained_together_end_where_each_ends_alone(small_cfg, tmp_path):
    """fit_seeds vmaps two seeds' runs into one computation: each lane's losses, held-out record and
    parameters are those of the seed trained alone (up to float reassociation in batched kernels)."""
    from bayesmeta.fit import fit_seeds

    cfg = small_cfg("train.steps=100", "train.eval_every=50")
    setup = run.Setup.from_config(cfg)

    def metric(params):
        return {"w": float(sum(jnp.sum(leaf) for leaf in jax.tree.leaves(params)))}

    together = fit_seeds(
        setup.method,
        setup.family,
        cfg.train,
        seeds=(3, 4),
        run_dirs=(tmp_path / "a", tmp_path / "b"),
        evaluate=metric,
        progress=False,
    )
    for seed, lane, folder in zip((3, 4), together, ("a", "b"), strict=True):
        alone = fit(setup.method, setup.family, cfg.train, seed=seed, evaluate=metric, progress=False)
        np.testing.assert_allclose(lane.trace.loss, alone.trace.loss, rtol=2e-4, atol=1e-6)
        assert lane.trace.eval_step == alone.trace.eval_step == [50, 100]
        np.testing.assert_allclose(lane.trace.eval["w"], alone.trace.eval["w"], rtol=2e-4)
        for x, y in zip(jax.tree.leaves(lane.params), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-5)
        _, saved = run.restore(dataclasses.replace(cfg, seed=seed), tmp_path / folder)
        assert saved.step == 100
        for x, y in zip(jax.tree.leaves(saved.params), jax.tree.leaves(lane.params), strict=True):
            np.testing.assert_array_equal(x, y)
    assert not np.allclose(together[0].trace.loss, together[1].trace.loss)


def test_a_diverging_seed_stops_alone_and_keeps_its_checkpoint(small_cfg, tmp_path):
    """Of seeds trained together, the one whose loss turns non-finite is returned as its NonFiniteError
    naming the step, its last good checkpoint kept; the other finishes as it would alone."""
    from bayesmeta.fit import NonFiniteError, fit_seeds

    cfg = small_cfg("train.steps=200")
    setup = run.Setup.from_config(cfg)
    dirs = (tmp_path / "a", tmp_path / "b")
    kw = {"seeds": (0, 1), "run_dirs": dirs, "progress": False}
    fit_seeds(setup.method, setup.family, cfg.train, until=100, **kw)
    # poison lane b's checkpoint: every weight 1e30, so its first resumed step overflows
    path = dirs[1] / CHECKPOINT
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    weights = [k for k, v in data.items() if k.startswith("leaf_") and v.dtype == np.float32]
    np.savez(path, **(data | {k: np.full_like(data[k], 1e30) for k in weights}))
    a, b = fit_seeds(setup.method, setup.family, cfg.train, resume=True, **kw)
    assert isinstance(b, NonFiniteError)
    assert re.search(r"at step 10[1-9]; last good state \(step 100\) kept in .*b", str(b)), str(b)
    alone = fit(setup.method, setup.family, cfg.train, seed=0, progress=False)
    assert a.step == 200
    np.testing.assert_allclose(a.trace.loss, alone.trace.loss, rtol=2e-4, atol=1e-6)
    with np.load(path) as z:
        assert int(z["step"]) == 100


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_step_schedule_scales_each_update_by_the_decay_at_its_interval(optimizer):
    """train.lr_schedule='step': with a constant gradient, SGD's update (and Adam's, whose normalised
    step is then the rate) is -lr, -lr, -lr/2, -lr/2, -lr/4 at lr_decay 0.5 every 2 steps."""
    step = ["train.lr=0.1", "train.lr_schedule='step'", "train.lr_decay_every=2"]
    cfg = registry.load_config(None, [f"train.optimizer='{optimizer}'", *step])
    opt = make_optimizer(cfg.train)
    params = {"w": jnp.zeros(3)}
    state, sizes = opt.init(params), []
    for _ in range(5):
        upd, state = opt.update({"w": jnp.ones(3)}, state, params)
        sizes.append(float(upd["w"][0]))
    np.testing.assert_allclose(sizes, [-0.1, -0.1, -0.05, -0.05, -0.025], rtol=1e-4)


def test_the_cosine_schedule_ends_at_zero_and_constant_keeps_the_optimizer_state():
    """'cosine' is lr at step 0, lr / 2 halfway and 0 at train.steps; the default 'constant' passes the
    rate as a number, so the optimizer state (and every checkpoint written before schedules) is as
    plain Adam's."""
    cfg = registry.load_config(None, ["train.lr=0.2", "train.steps=100", "train.lr_schedule='cosine'"])
    rate = learning_rate(cfg.train)
    np.testing.assert_allclose([rate(0), rate(50), rate(100)], [0.2, 0.1, 0.0], atol=1e-7)
    plain = registry.load_config(None, []).train
    params = {"w": jnp.zeros(3)}
    assert learning_rate(plain) == plain.lr
    assert jax.tree.structure(make_optimizer(plain).init(params)) == jax.tree.structure(
        optax.adam(plain.lr).init(params)
    )
