"""Experiment grids: finished runs are reused (also from their committed records), a diverging run is
reported and the grid goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from filelock import FileLock

from bayesmeta import experiment, run
from bayesmeta.config import DEFAULT_CONFIG
from bayesmeta.experiment import Cell, _stats, recorded, run_grid
from bayesmeta.fit import CHECKPOINT
from bayesmeta.io import LOCK
from tests.conftest import SMALL


def test_grid_reports_failed_runs_and_reuses_finished_ones(tmp_path):
    small = (*SMALL, "train.steps=100", "eval.memorization_tasks=0")
    cells = [Cell("ok", "s", 0, small), Cell("bad", "s", 0, (*small, "train.lr=1e30"))]
    res = run_grid("t", DEFAULT_CONFIG, cells, ["mse@10"], tmp_path, progress=False)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "failed: non-finite loss or parameters at step" in md and "Failed runs" in md
    assert [r["method"] for r in res.rows] == ["ok"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"][0]["n"] == 1
    # a second invocation reuses the finished run (same config read back through the current code)
    again = run_grid("t", DEFAULT_CONFIG, cells[:1], ["mse@10"], tmp_path, progress=False)
    assert again.outcomes[0].reused
    assert again.rows[0]["mean"] == res.rows[0]["mean"]
    # without runs/ (another machine, a fresh clone), the committed record in cells/ is reused...
    shutil.rmtree(tmp_path / "runs")
    third = run_grid("t", DEFAULT_CONFIG, cells, ["mse@10"], tmp_path, progress=False)
    assert third.outcomes[0].reused and not (tmp_path / "runs").exists()
    assert third.rows[0]["mean"] == res.rows[0]["mean"]
    # ...and so is the failure (the same seed diverges again), its checkpoint path relative
    assert third.outcomes[1].reused and third.outcomes[1].error == res.outcomes[1].error
    assert "kept in runs/bad-s-seed0/checkpoint/state.npz" in res.outcomes[1].error
    # ...but not for another config: that cell trains
    other = Cell("ok", "s", 0, (*small, "train.lr=2e-3"))
    fourth = run_grid("t", DEFAULT_CONFIG, [other], ["mse@10"], tmp_path, progress=False)
    assert not fourth.outcomes[0].reused and (tmp_path / "runs").exists()


def test_a_curve_is_flat_only_when_its_last_quarter_stops_changing(tmp_path):
    from bayesmeta.experiment import Cell, Outcome, curve_table, end_change, plot_curves

    falling = {str(100 * i): 1.0 / (1 + i) for i in range(1, 17)}  # 1/(1+i): still falls 20% at the end
    flat = {str(100 * i): 0.5 + (0.3 if i < 4 else 0.0) for i in range(1, 17)}
    assert end_change(flat) == 0.0
    assert end_change(falling) == pytest.approx(
        (np.mean([1 / 10, 1 / 11, 1 / 12, 1 / 13]) - np.mean([1 / 14, 1 / 15, 1 / 16, 1 / 17]))
        / np.mean([1 / 10, 1 / 11, 1 / 12, 1 / 13])
    )
    assert end_change({"1": 1.0, "2": 0.5}) is None  # too few points to say
    outs = [
        Outcome(Cell("A", "s", 0), {"history": {"mse@5": falling}}, 1.0),
        Outcome(Cell("B", "s", 0), {"history": {"mse@5": flat}}, 1.0),
    ]
    table = curve_table(outs, "mse@5")
    assert "| still falling |" in table and "| flat |" in table
    assert plot_curves(outs, "mse@5", tmp_path / "curves.png").stat().st_size > 0


def reliability_entry(accuracy: float, ece: float, steps: str = "5") -> dict:
    """A metrics.json reliability entry at `steps` test-time steps whose diagram is told apart by accuracy."""
    diagram = {
        "edges": [0.0, 0.5, 1.0],
        "count": [0, 4],
        "accuracy": [0.0, accuracy],
        "confidence": [0.0, 0.8],
    }
    return {"reliability": {steps: {"ece": ece, "diagram": diagram}}}


def draw_spy(monkeypatch) -> list:
    """Records (accuracy panel, share panel, diagram) of every report.draw_reliability call, and draws."""
    from bayesmeta import report

    calls, draw = [], report.draw_reliability

    def spy(ax, ax_share, diagram):
        calls.append((ax, ax_share, diagram))
        draw(ax, ax_share, diagram)

    monkeypatch.setattr(report, "draw_reliability", spy)
    return calls


def test_the_reliability_grid_draws_each_methods_first_seed(tmp_path, monkeypatch):
    """One column per method that has a run with an entry at the requested steps, in the order of those
    first runs, each drawing the diagram of the method's first seed with the entry; failed runs, runs
    without that entry and methods with none are not drawn."""
    from bayesmeta.experiment import Outcome, plot_reliability_grid

    calls = draw_spy(monkeypatch)
    a1, b0, a2 = reliability_entry(0.25, 0.011), reliability_entry(0.5, 0.022), reliability_entry(0.75, 0.033)
    outcomes = [
        Outcome(Cell("A", "s", 0), {"reliability": {}}, 1.0),  # no entry at 5 steps: skipped
        Outcome(Cell("B", "s", 0), b0, 1.0),
        Outcome(Cell("C", "s", 0), None, 1.0, error="diverged"),  # failed: C has no column
        Outcome(Cell("A", "s", 1), a1, 1.0),
        Outcome(Cell("D", "s", 0), reliability_entry(0.9, 0.044, steps="10"), 1.0),  # other steps only
        Outcome(Cell("B", "s", 1), reliability_entry(0.1, 0.055), 1.0),
        Outcome(Cell("A", "s", 2), a2, 1.0),
    ]
    path = plot_reliability_grid(outcomes, 5, tmp_path / "r.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [c[2] for c in calls] == [b0["reliability"]["5"]["diagram"], a1["reliability"]["5"]["diagram"]]
    assert [c[0].get_title() for c in calls] == ["B\nECE 0.022 (seed 0)", "A\nECE 0.011 (seed 1)"]
    (ax0, share0, _), (ax1, share1, _) = calls  # columns left to right, a share panel under each
    assert ax0.get_position().x0 < ax1.get_position().x0
    for ax, share in ((ax0, share0), (ax1, share1)):
        assert share is not ax and share.get_position().y1 <= ax.get_position().y0
        assert share.get_position().x0 == pytest.approx(ax.get_position().x0)


def test_the_reliability_grid_draws_the_lowest_seed_whatever_the_list_order(tmp_path, monkeypatch):
    """'First seed' as adapted_functions and docs/results.md (reliability.png, seed 0) read it: the
    lowest seed with an entry, even when the outcomes list a higher seed first (e.g. --seeds 2 0 1)."""
    from bayesmeta.experiment import Outcome, plot_reliability_grid

    calls = draw_spy(monkeypatch)
    a2, a0 = reliability_entry(0.75, 0.033), reliability_entry(0.25, 0.011)
    outcomes = [Outcome(Cell("A", "s", 2), a2, 1.0), Outcome(Cell("A", "s", 0), a0, 1.0)]
    plot_reliability_grid(outcomes, 5, tmp_path / "r.png")
    assert [c[2] for c in calls] == [a0["reliability"]["5"]["diagram"]]
    assert calls[0][0].get_title() == "A\nECE 0.011 (seed 0)"


def test_an_evaluation_cell_is_reused_from_its_record(tmp_path):
    small = (*SMALL, "train.steps=50", "eval.memorization_tasks=0")
    cell = Cell("ok", "fewer tasks", 0, small, evaluation=("eval.tasks=20",))
    first = run_grid("t", DEFAULT_CONFIG, [cell], ["mse@10"], tmp_path, progress=False)
    assert (tmp_path / "cells" / cell.run_name / "evals" / "fewer tasks" / "metrics.json").is_file()
    shutil.rmtree(tmp_path / "runs")
    again = run_grid("t", DEFAULT_CONFIG, [cell], ["mse@10"], tmp_path, progress=False)
    assert again.outcomes[0].reused and not (tmp_path / "runs").exists()
    assert again.rows[0]["mean"] == first.rows[0]["mean"] and first.rows[0]["tasks_per_seed"] == 20


def test_recorded_keeps_the_cells_with_a_result_for_their_config(tmp_path):
    """recorded() selects what a grid has run: a finished evaluation cell, not its other seed (never
    run) nor the same cell under another config."""
    small = (*SMALL, "train.steps=50", "eval.memorization_tasks=0")
    cell = Cell("m", "ten", 0, small, ("eval.tasks=10",))
    run_grid("t", DEFAULT_CONFIG, [cell], ["mse@10"], tmp_path, progress=False)
    other_seed = Cell("m", "ten", 1, small, ("eval.tasks=10",))
    changed = Cell("m", "ten", 0, small, ("eval.tasks=12",))
    assert recorded([cell, other_seed, changed], DEFAULT_CONFIG, tmp_path) == [cell]


def test_an_evaluation_equal_to_the_training_runs_own_is_not_repeated(tmp_path):
    small = (*SMALL, "train.steps=50", "eval.memorization_tasks=0", "eval.tasks=20")
    own = Cell("ok", "own", 0, small, evaluation=("eval.tasks=20",))  # what the run was evaluated with
    other = Cell("ok", "fewer", 0, small, evaluation=("eval.tasks=10",))
    res = run_grid("t", DEFAULT_CONFIG, [own, other], ["mse@10"], tmp_path, progress=False)
    run_dir = tmp_path / "runs" / own.run_name
    assert not (run_dir / "evals" / "own").exists()
    assert (run_dir / "evals" / "fewer" / "metrics.json").is_file()
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert res.outcomes[0].metrics == trained and res.outcomes[1].metrics["eval_tasks"] == 10
    assert (tmp_path / "cells" / own.run_name / "evals" / "own" / "metrics.json").is_file()


def test_evaluations_on_other_held_out_settings_reuse_the_fits_bound(tmp_path):
    """The PAC-Bayes bound reads the training tasks only: an MR-MAML(W) fit writes it to its run's
    cache, and a later grid's evaluation of that fit on another held-out setting takes it from there
    (a value planted in the entry comes back; no second entry)."""
    small = (
        *SMALL,
        "task.family='nme_sinusoid'",
        "model.method='mr_maml_w'",
        "train.steps=50",
        "eval.memorization_tasks=0",
        "eval.bound_tasks=20",
        "eval.tasks=20",
        "eval.plot_tasks=0",
        "eval.samples=2",
        "eval.posterior_draws=5",
        "eval.inner_steps=[1]",
        "model.net.hidden=[8]",
    )
    own = Cell("mr", "own", 0, small, evaluation=("eval.tasks=20",))  # the training run's own evaluation
    k7 = Cell("mr", "k7", 0, small, evaluation=("eval.task.shots=7",))
    first = run_grid("t", DEFAULT_CONFIG, [own], ["mse@1"], tmp_path, progress=False).outcomes[0]
    run_dir = tmp_path / "runs" / own.run_name
    (entry,) = (run_dir / "cache").glob("pac_bayes-*.json")
    own = json.loads((run_dir / "metrics.json").read_text())["pac_bayes"]
    assert json.loads(entry.read_text()) == own == first.metrics["pac_bayes"]
    entry.write_text(json.dumps(own | {"bound": 0.5}))  # a mark: only a reuse can report it
    later = run_grid("t", DEFAULT_CONFIG, [k7], ["mse@1"], tmp_path, progress=False).outcomes[0]
    assert later.metrics["pac_bayes"]["bound"] == 0.5 and later.metrics["eval_tasks"] == 20
    assert len(list((run_dir / "cache").glob("pac_bayes-*.json"))) == 1


def test_seeds_of_one_configuration_train_together_and_a_failing_pair_is_reported(tmp_path, capsys):
    """run_grid trains the untrained seeds of each configuration as lanes of one computation: both
    seeds of "ok" finish and are recorded, both of "bad" fail with the step named, and a second
    invocation reuses the finished runs."""
    small = (*SMALL, "train.steps=60", "train.log_every=20", "eval.memorization_tasks=0")
    cells = [Cell("ok", "s", s, small) for s in (0, 1)] + [
        Cell("bad", "s", s, (*small, "train.lr=1e30")) for s in (0, 1)
    ]
    res = run_grid("t", DEFAULT_CONFIG, cells, ["mse@10"], tmp_path, progress=False, lanes=5)
    err = capsys.readouterr().err
    assert "training 2 seeds together: ok-s-seed0, ok-s-seed1" in err
    assert "training 2 seeds together: bad-s-seed0, bad-s-seed1" in err
    ok = [o for o in res.outcomes if o.cell.method == "ok"]
    assert all(o.metrics is not None and not o.reused for o in ok)
    assert ok[0].metrics["metrics"] != ok[1].metrics["metrics"]  # two seeds, not one run twice
    assert all((tmp_path / "cells" / o.cell.run_name / "metrics.json").is_file() for o in ok)
    bad = [o for o in res.outcomes if o.cell.method == "bad"]
    assert all(o.metrics is None and "non-finite loss or parameters at step" in o.error for o in bad)
    again = run_grid("t", DEFAULT_CONFIG, cells[:2], ["mse@10"], tmp_path, progress=False, lanes=5)
    assert all(o.reused for o in again.outcomes)
    assert "together" not in capsys.readouterr().err


def test_two_jobs_run_a_grid_in_worker_processes_as_one_would(tmp_path):
    """jobs=2 trains the runs in two worker processes: the same numbers as the serial grid, a failed
    run reported as failed, and both recorded for reuse."""
    small = (*SMALL, "train.steps=60", "train.log_every=20", "eval.memorization_tasks=0")
    cells = [Cell("ok", "s", 0, small), Cell("bad", "s", 0, (*small, "train.lr=1e30"))]
    par = run_grid("t", DEFAULT_CONFIG, cells, ["mse@10"], tmp_path / "par", progress=False, jobs=2)
    ser = run_grid("t", DEFAULT_CONFIG, cells, ["mse@10"], tmp_path / "ser", progress=False)
    assert [o.cell for o in par.outcomes] == cells
    assert par.outcomes[0].metrics["metrics"] == ser.outcomes[0].metrics["metrics"]
    assert par.outcomes[1].metrics is None and "non-finite loss" in par.outcomes[1].error
    assert (tmp_path / "par" / "cells" / "ok-s-seed0" / "metrics.json").is_file()
    assert (tmp_path / "par" / "cells" / "bad-s-seed0" / "failed.json").is_file()


def test_adapted_functions_draw_each_method_with_a_run_folder_and_name_the_rest(tmp_path):
    """A cell reused from its record has no run folder to restore: its method is named, not drawn,
    unless its record keeps the curves of an earlier drawing (as on a fresh clone of a finished grid)."""
    from bayesmeta.experiment import adapted_functions, unplotted

    small = (*SMALL, "train.steps=50", "eval.memorization_tasks=0", "eval.tasks=10")
    cells = [Cell("A", "s", 0, small), Cell("B", "s", 0, small)]
    res = run_grid("t", DEFAULT_CONFIG, cells, ["mse@10"], tmp_path, progress=False)
    shutil.rmtree(tmp_path / "runs" / cells[1].run_name)
    functions = adapted_functions(res.outcomes, DEFAULT_CONFIG, tmp_path, {"one task": ()}, 1)
    panel = functions["one task"]
    assert set(panel["f"]) == {"A"} and panel["f"]["A"].shape == panel["truth"].shape
    assert np.all(np.isfinite(panel["f"]["A"]))
    assert unplotted(res.outcomes, functions) == ["B"]
    shutil.rmtree(tmp_path / "runs" / cells[0].run_name)  # A now has only its record's adapted.json
    again = adapted_functions(res.outcomes, DEFAULT_CONFIG, tmp_path, {"one task": ()}, 1)
    np.testing.assert_allclose(again["one task"]["f"]["A"], panel["f"]["A"], rtol=1e-6)
    np.testing.assert_allclose(again["one task"]["truth"], panel["truth"], rtol=1e-6)
    assert adapted_functions(res.outcomes, DEFAULT_CONFIG, tmp_path, {"one task": ()}, 5) == {}  # other steps


def test_a_cells_record_never_pairs_one_configs_result_with_anothers(tmp_path):
    """A rerun under a new config replaces the record whole: a failure removes the old metrics.json (else
    it would read as the new config's result) and a success removes an old failed.json."""
    small = (*SMALL, "train.steps=50", "eval.memorization_tasks=0", "eval.tasks=10")
    record = tmp_path / "cells" / "c-s-seed0"
    run_grid("t", DEFAULT_CONFIG, [Cell("c", "s", 0, small)], ["mse@10"], tmp_path, progress=False)
    assert (record / "metrics.json").is_file()
    failing = Cell("c", "s", 0, (*small, "train.lr=1e30"))
    res = run_grid("t", DEFAULT_CONFIG, [failing], ["mse@10"], tmp_path, progress=False)
    assert res.outcomes[0].error and not (record / "metrics.json").exists()
    assert (record / "failed.json").is_file()
    shutil.rmtree(tmp_path / "runs")
    again = run_grid("t", DEFAULT_CONFIG, [failing], ["mse@10"], tmp_path, progress=False)
    assert again.outcomes[0].reused and again.outcomes[0].metrics is None
    fixed = Cell("c", "s", 0, (*small, "train.lr=2e-3"))
    res = run_grid("t", DEFAULT_CONFIG, [fixed], ["mse@10"], tmp_path, progress=False)
    assert res.outcomes[0].metrics is not None and not (record / "failed.json").exists()


def test_a_parked_run_resumes_on_a_fresh_clone_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    """A grid interrupted mid-run parks it into its record (checkpoint and config), and an experiment
    script (experiment.script) ends with one line on how to resume and status 130; where runs/ is gone
    the run resumes from there and ends where the run without the interruption ends; the finished
    record drops the parked copy."""
    small = (*SMALL, "eval.memorization_tasks=0", "eval.tasks=10")  # 200 steps, a checkpoint every 100
    cell = Cell("c", "s", 0, small)
    whole = run_grid("t", DEFAULT_CONFIG, [cell], ["mse@10"], tmp_path / "a", progress=False)
    out, train = tmp_path / "b", run.train

    def interrupted(*a, **k):  # Ctrl-C after step 100 (fit checkpoints there, as on any interrupt)
        train(*a, **k, until=100)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupted)
    with pytest.raises(SystemExit) as stopped:
        experiment.script(lambda: run_grid("t", DEFAULT_CONFIG, [cell], ["mse@10"], out, progress=False))
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "parked c-s-seed0" in err and "rerun the same command to resume" in err and "Traceback" not in err
    parked = out / "cells" / "c-s-seed0" / "parked"
    assert (parked / "state.npz").read_bytes() == (cell.run_dir(out) / CHECKPOINT).read_bytes()
    with FileLock(cell.run_dir(out) / LOCK):  # another process training it (run_lock is re-entrant)
        assert experiment.park(out) == []  # a run in use is left alone
    shutil.rmtree(out / "runs")
    resumed = []
    monkeypatch.setattr(run, "train", lambda *a, **k: resumed.append(k["resume"]) or train(*a, **k))
    res = run_grid("t", DEFAULT_CONFIG, [cell], ["mse@10"], out, progress=False)
    metrics = res.outcomes[0].metrics
    assert resumed == [True] and not res.outcomes[0].reused and metrics["steps"] == 200
    assert metrics["final_loss"] == whole.outcomes[0].metrics["final_loss"]
    assert metrics["metrics"] == whole.outcomes[0].metrics["metrics"]
    assert not parked.exists()
    assert experiment.park(out) == []  # a finished run is not parked


def test_an_older_record_holds_unless_a_later_version_changed_a_section_it_has():
    """Version 5 changed only calibration: a version-4 record without it (classification) is reused,
    one with it is not, a recorded failure is; version 3 (before 4 changed the PIT) never is."""
    from bayesmeta.run import METRICS_VERSION, up_to_date

    assert up_to_date({"version": METRICS_VERSION, "calibration": {"5": {"nll": 1.0}}})
    assert up_to_date({"version": 4, "calibration": {}, "metrics": {"accuracy@1": {}}})
    assert not up_to_date({"version": 4, "calibration": {"5": {"nll": 1.0}}})
    assert up_to_date({"version": 4, "error": "non-finite loss", "seconds": 1.0})
    assert not up_to_date({"version": 3})
    assert not up_to_date({}) and not up_to_date({"version": METRICS_VERSION + 1})


def test_a_joint_target_is_met_only_by_one_method_meeting_every_condition():
    """A wide predictive (coverage met, NLL not) and a sharp one (NLL met, coverage not) each meet one
    condition: missed; a method meeting both is named; a dominated mean and the reference never count."""
    from bayesmeta.experiment import Condition, joint_target_table

    def row(method, metric, mean, dominated=False):
        return {
            "method": method,
            "setting": "s",
            "metric": metric,
            "mean": mean,
            "sd": 0.0,
            "dominated": dominated,
        }

    conds = (
        Condition("nll", "nll <= 0.1", lambda v: v <= 0.1),
        Condition("cov", "cov >= 0.9", lambda v: v >= 0.9),
    )
    split = [
        row("wide", "nll", 0.5),
        row("wide", "cov", 0.95),
        row("sharp", "nll", 0.05),
        row("sharp", "cov", 0.6),
    ]
    table = joint_target_table(split, conds)
    assert "**Missed**" in table and "| wide | s | 0.500 (0.000) | 0.950 (0.000) ✓ | 1 of 2 |" in table
    ref = [row("ref", "nll", 0.0), row("ref", "cov", 0.95)]
    dominated = [row("dom", "nll", 0.0, dominated=True), row("dom", "cov", 0.95)]
    assert "**Missed**" in joint_target_table(split + ref + dominated, conds, reference="ref")
    good = [row("good", "nll", 0.08), row("good", "cov", 0.91)]
    assert "**Met** by good (s)" in joint_target_table(split + good, conds)


CACHE_PROBE = """
import jax, jax.numpy as jnp
from bayesmeta.experiment import compilation_cache
compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
"""


def _cache_probe(tmp_path, **env: str) -> tuple[str, int]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    # every program is cached, however fast it compiled (the probe's one is tiny)
    env = keep | {"HOME": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} | env
    done = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    folder, size = done.stdout.split()
    return folder, int(size)


def test_the_default_compilation_cache_is_bounded_and_locked(tmp_path):
    """Without a configured cache, experiments use ~/.cache/bayesmeta/xla with a size bound, which makes
    JAX lock the folder and record each entry's last use (the files of its LRU cache); a cache the user
    configured is left as it is."""
    folder, size = _cache_probe(tmp_path)
    assert folder == str(tmp_path / ".cache" / "bayesmeta" / "xla") and size > 0
    names = [p.name for p in (tmp_path / ".cache" / "bayesmeta" / "xla").iterdir()]
    assert ".lockfile" in names and any(n.endswith("-cache") for n in names), names
    assert any(n.endswith("-atime") for n in names), names
    own = tmp_path / "own"
    assert _cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(own)) == (str(own), -1)
    assert not (own / ".lockfile").exists() and any(own.iterdir())


def test_a_diagnostic_a_run_did_not_compute_is_missing_not_an_error():
    """A grid may ask every setting for the memorization meter while one setting turns it off
    (eval.memorization_tasks = 0): that cell's value is missing (n/a in the table), not a KeyError."""
    metrics = {"metrics": {}, "diagnostics": {"support_dependence@5": 0.25}}
    assert _stats(metrics, "support_dependence@5")["mean"] == 0.25
    gone = _stats(metrics, "support_dependence@20")
    assert gone["mean"] is None and gone["missing"]
