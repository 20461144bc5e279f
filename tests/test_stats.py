"""Numbers that cannot overstate: the divergence rule, dominated means, verdicts and contrasts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesmeta.stats import Published, contrast_verdict, diverged_tasks, summarize, verdict


def test_a_task_whose_support_loss_rose_is_diverged_even_when_finite():
    start = np.array([1.0, 1.0, 1.0, 1.0])
    end = np.array([0.5, 1.0, 1.5, np.inf])
    np.testing.assert_array_equal(diverged_tasks(start, end), [False, False, True, True])


def test_summary_leaves_diverged_tasks_out_of_the_mean_and_counts_them():
    values = np.array([1.0, 2.0, 3.0, 3.3e6, np.nan])
    diverged = np.array([False, False, False, True, False])
    s = summarize(values, diverged)
    assert s["mean"] == pytest.approx(2.0)
    assert s["n"] == 5 and s["n_diverged"] == 2  # the huge finite task by the rule, the NaN by itself
    assert s["median"] == pytest.approx(3.0)  # over all tasks, non-finite ranked worst
    assert s["mean_all"] is None  # the NaN task
    assert not s["dominated"]


def test_a_mean_that_one_task_dominates_is_flagged():
    values = np.r_[np.full(99, 0.1), 1e3]
    s = summarize(values)
    assert s["dominated"] and s["max_share"] > 0.99
    assert not summarize(np.full(100, 0.1))["dominated"]


def test_all_diverged_gives_no_mean():
    s = summarize(np.array([1.0, 2.0]), np.array([True, True]))
    assert s["mean"] is None and s["ci95"] is None and s["n_diverged"] == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=30))
def test_summary_is_finite_or_none(values):
    s = summarize(np.asarray(values))
    for k in ("mean", "sd", "ci95", "median", "mean_all"):
        assert s[k] is None or np.isfinite(s[k])
    assert 0 <= s["n_diverged"] <= s["n"] == len(values)


def test_verdict_uses_our_seeds_and_the_papers_sd():
    # ours 0.50 +- t-interval over 3 seeds; the paper's 0.46 (0.04): within the combined interval
    assert verdict("mse@1", [0.48, 0.50, 0.52], None, Published(0.46, 0.04))[0] == "matches"
    # far below the published error: better; far above: worse
    assert verdict("mse@1", [0.10, 0.11, 0.12], None, Published(0.46, 0.04))[0] == "better"
    assert verdict("mse@1", [0.90, 0.91, 0.92], None, Published(0.46, 0.04))[0] == "worse"
    # accuracy: higher is better
    assert verdict("accuracy@5", [0.90, 0.91, 0.92], None, Published(0.80))[0] == "better"
    # seeds spread over more than the published value: no verdict either way
    assert verdict("mse@100", [0.1, 0.9, 0.3], None, Published(0.10, 0.01))[0].startswith("inconclusive")
    assert verdict("mse@100", [0.8, 1.0, 0.9], None, Published(0.10, 0.01))[0] == "worse"  # significant
    # one seed: the CI over tasks is our interval
    assert verdict("accuracy@5", [0.79], 0.02, Published(0.80))[0] == "matches"
    assert verdict("accuracy@5", [0.70], 0.02, Published(0.80))[0] == "worse"


def test_a_failure_baseline_is_never_reached_by_doing_better():
    word, _ = verdict("accuracy@1", [0.656], 0.01, Published(0.078, 0.002, baseline=True))
    assert "baseline" in word and word != "better"


def test_contrast_verdicts():
    # MR-MAML(W) minus MAML, paper -0.30: ours clearly negative on every seed
    r = contrast_verdict([-0.40, -0.45, -0.42], -0.30, "mse@100")
    assert r["verdict"] == "reproduced" and r["size"] == "above our interval"
    assert contrast_verdict([-0.1, 0.1, 0.05], -0.30, "mse@100")["verdict"].startswith("not reproduced")
    assert contrast_verdict([0.2, 0.25, 0.3], -0.30, "mse@100")["verdict"] == "reversed"
    assert contrast_verdict([0.02, 0.03, 0.025], None, "accuracy@5")["verdict"] == "better"
    assert contrast_verdict([0.02], None, "accuracy@5")["verdict"] == "one seed, no interval"
    assert contrast_verdict([-0.3], 0.75, "accuracy@1")["verdict"].endswith(
        "opposite to the published direction"
    )


def test_evaluation_counts_tasks_whose_inner_loop_raised_the_support_loss(small_cfg):
    """The engine's evaluation applies the rule: at a step size that overshoots, the adapted support
    loss rises on the tasks and they are counted diverged and left out of the mean; a small step
    diverges nowhere."""
    import jax

    from bayesmeta import run
    from bayesmeta.predict import eval_tasks, evaluate

    def summary(lr: float) -> dict:
        setup = run.Setup.from_config(small_cfg(f"model.inner_lr={lr}"))
        svi = run.make_svi(setup.method, setup.cfg.train)
        state, _ = run.initial_state(svi, setup.family, setup.cfg.train, 0)
        params = svi.get_params(state)
        batches = eval_tasks(setup.family, jax.random.PRNGKey(1), 40, 20)
        ev = evaluate(setup.method, setup.likelihood, params, batches, (5,), 1, jax.random.PRNGKey(2))
        return ev.summary()["mse@5"]

    small, big = summary(1e-3), summary(3.0)
    assert small["n_diverged"] == 0 and small["mean"] is not None
    assert big["n_diverged"] == big["n"] == 40 and big["mean"] is None  # every task blew up
