"""The run folder: one writer at a time, all-or-nothing results, nothing changed by a refused or
invalid command, nothing lost by kill -9, and errors that say what to do."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesmeta import registry, run
from bayesmeta.cli import RUN_FILES, main
from bayesmeta.fit import CHECKPOINT, fit
from bayesmeta.io import LOCK_OWNER, locked_message, publish, run_lock, write_json
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
TINY = [*SMALL, "train.steps=50", "train.eval_every=50", "train.checkpoint_every=50", "eval.tasks=20"]
TINY += ["eval.memorization_tasks=0", "eval.plot_tasks=0", "train.eval_tasks=10", "eval.inner_steps=[1]"]


def sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (50 steps), to be copied by tests that change it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run.train(registry.load_config(None, TINY), run_dir, progress=False)
    return run_dir


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
numbers = finite_or_not | finite_or_not.map(np.float32) | finite_or_not.map(np.float64) | st.integers()
nested = st.recursive(
    numbers | st.none() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


@settings(deadline=None, max_examples=50)
@given(nested)
def test_write_json_writes_non_finite_numbers_as_null(tmp_path_factory, obj):
    path = tmp_path_factory.mktemp("json") / "x.json"
    write_json(path, obj)  # never raises on NaN or inf

    def expected(o):
        if isinstance(o, dict):
            return {k: expected(v) for k, v in o.items()}
        if isinstance(o, list):
            return [expected(v) for v in o]
        if isinstance(o, np.generic):
            o = o.item()
        return None if isinstance(o, float) and not math.isfinite(o) else o

    assert json.loads(path.read_text()) == expected(obj)


def test_a_diverged_diagnostic_is_null_in_metrics_json(tmp_path):
    """A large inner learning rate makes the inner loop diverge on some tasks: the run still finishes,
    with null for the non-finite values."""
    run_dir = tmp_path / "run"
    cfg = registry.load_config(
        None, [*TINY, "model.inner_lr=5.0", "eval.inner_steps=[3]", "eval.memorization_tasks=4"]
    )
    _, metrics = run.train(cfg, run_dir, progress=False)
    text = (run_dir / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text)
    assert written["metrics"]["mse@3"]["mean"] is None  # it diverged on some tasks
    assert None in written["diagnostics"].values()  # a support-dependence value is NaN
    assert any(isinstance(v, float) and not math.isfinite(v) for v in metrics["diagnostics"].values())
    for name in ("inference.nc", "summary.md", "config.toml", "plots/training.png"):
        assert (run_dir / name).is_file()
    assert main(["report", str(run_dir)]) == 0  # the summary redrawn from the file reads the nulls
    assert "- support_dependence@3: diverged" in (run_dir / "summary.md").read_text()


def test_a_failed_finish_leaves_the_previous_outputs(copy, monkeypatch):
    before = snapshot(copy)
    cfg = registry.load_config(copy / "config.toml", ["eval.tasks=10"])
    setup, result = run.restore(cfg, copy)

    def broken(*args, **kwargs):
        raise ValueError("the plotting library broke")

    monkeypatch.setattr(run, "write_report", broken)
    with pytest.raises(ValueError, match="plotting library broke"):
        run.finish(setup, copy, result, progress=False)
    assert snapshot(copy) == before
    assert not list(copy.glob(".staging-*"))


def test_publish_replaces_every_entry_and_the_subfolders_whole(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.png").write_bytes(b"old")
    (tmp_path / "metrics.json").write_text("{}")

    def write(stage: Path) -> None:
        (stage / "plots").mkdir()
        (stage / "plots" / "new.png").write_bytes(b"new")
        (stage / "metrics.json").write_text('{"a": 1}')

    publish(tmp_path, write, last=("metrics.json",))
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["new.png"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".staging-*"))


HOLD = """
import sys, time
from bayesmeta.io import run_lock
with run_lock(sys.argv[1], "bayesmeta fit"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_changes_nothing(copy, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(copy)], stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(copy)
        assert main(["fit", "--resume", "--run-dir", str(copy), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"is in use by pid {holder.pid} (bayesmeta fit, since " in err, err
        assert err.endswith("wait for it or use another --run-dir"), err
        assert main(["evaluate", str(copy), "--no-progress"]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert main(["fit", "--force", "--run-dir", str(copy), *sets(TINY)]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert main(["report", str(copy)]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert snapshot(copy) == before
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_reentrant_and_a_dead_owner_is_not_named(tmp_path):
    with run_lock(tmp_path, "bayesmeta fit"), run_lock(tmp_path, "bayesmeta evaluate"):
        assert json.loads((tmp_path / LOCK_OWNER).read_text())["command"] == "bayesmeta fit"
    assert not (tmp_path / LOCK_OWNER).exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = {"pid": dead.pid, "host": os.uname().nodename, "command": "bayesmeta fit", "since": "x"}
    (tmp_path / LOCK_OWNER).write_text(json.dumps(owner))
    assert locked_message(tmp_path) == (
        f"{tmp_path} is in use by another process; wait for it or use another --run-dir"
    )
    with run_lock(tmp_path, "bayesmeta fit"):  # a stale owner file does not block
        assert json.loads((tmp_path / LOCK_OWNER).read_text())["pid"] == os.getpid()


def test_a_lock_on_a_new_folder_that_stays_empty_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), run_lock(tmp_path / "new", "bayesmeta fit"):
        raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_stale_temporaries_are_removed_under_the_lock(copy):
    stale = [copy / ".metrics.json.abc123.tmp", copy / "checkpoint" / ".state.npz.xyz.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    (copy / ".staging-old").mkdir()
    (copy / ".staging-old" / "metrics.json").write_text("{}")
    kept = copy / "notes.tmp"  # not one of ours
    kept.write_text("mine")
    with run_lock(copy, "bayesmeta evaluate"):
        assert not any(p.exists() for p in stale)
        assert not (copy / ".staging-old").exists()
    assert kept.read_text() == "mine"


def test_a_failed_resume_leaves_the_config_unchanged(copy, capsys):
    before = snapshot(copy)
    code = main(["fit", "--resume", "--run-dir", str(copy), "--set", "model.net.hidden=[20, 20]"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "does not match the configured model" in err
    assert snapshot(copy) == before
    _, result = run.restore(registry.load_config(copy / "config.toml"), copy)  # still usable
    assert result.step == 50


def test_an_invalid_device_count_creates_nothing(tmp_path, capsys):
    run_dir = tmp_path / "new"
    assert main(["fit", "--run-dir", str(run_dir), *sets(["train.devices=5", "train.meta_batch=5"])]) == 2
    assert "train.devices: 5 requested" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("name", RUN_FILES)
def test_fit_refuses_a_folder_with_any_result_file(tmp_path, capsys, name):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("kept")
    assert main(["fit", "--run-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"already holds a run ({name} exists); pass --resume" in err and "--force" in err, err
    assert path.read_text() == "kept"


def test_a_fresh_start_removes_the_previous_results(copy):
    """--force starts over: no metrics or checkpoint of the old run stay beside the new config."""
    cfg = registry.load_config(None, [*TINY, "train.steps=100", "name='again'"])
    result, metrics = run.train(cfg, copy, until=50, progress=False)
    assert metrics is None and result.step == 50
    assert not (copy / "metrics.json").exists() and not (copy / "inference.nc").exists()
    assert registry.load_config(copy / "config.toml").name == "again"


def test_missing_files_are_one_line_errors(copy, tmp_path, capsys):
    (copy / CHECKPOINT).unlink()
    for command in (["evaluate", str(copy)], ["sample", str(copy)]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip()
        assert err == (
            f"bayesmeta: error: {copy} has no checkpoint (checkpoint/state.npz): it was never trained, "
            "or training was interrupted before the first checkpoint; run bayesmeta fit first"
        )
    assert main(["fit", "--resume", "--run-dir", str(copy)]) == 1
    assert "has no checkpoint to resume from" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a run folder (it has no config.toml)" in err, err


KILLED = [
    *TINY,
    "train.steps=1000",
    "train.checkpoint_every=50",
    "train.eval_every=1000",
    "eval.tasks=10",
]


def test_kill_9_loses_nothing(tmp_path):
    """A fit killed with SIGKILL after a checkpoint resumes (its lock gone with it) to the parameters
    of an uninterrupted run."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bayesmeta.cli",
            "fit",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *sets(KILLED),
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / CHECKPOINT).is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run_dir / LOCK_OWNER).read_text())["pid"] == proc.pid  # left by the dead process
    cfg = registry.load_config(run_dir / "config.toml")
    _, killed = run.restore(cfg, run_dir)
    assert 0 < killed.step < cfg.train.steps and not (run_dir / "metrics.json").exists()

    assert main(["fit", "--resume", "--run-dir", str(run_dir), "--no-progress"]) == 0
    _, resumed = run.restore(cfg, run_dir)
    setup = run.Setup.from_config(cfg)
    full = fit(setup.method, setup.family, cfg.train, seed=cfg.seed, progress=False)
    assert resumed.step == full.step == cfg.train.steps
    for k in full.params:
        np.testing.assert_array_equal(full.params[k], resumed.params[k])
    np.testing.assert_array_equal(full.trace.loss, resumed.trace.loss)
    assert (run_dir / "metrics.json").is_file() and not list(run_dir.rglob("*.tmp"))


def test_an_experiment_evaluation_publishes_its_config_with_its_metrics(tmp_path):
    """evaluate_cell: the evaluation's config.toml arrives with its metrics (run.finish publishes both),
    so a reused evaluation always matches its config; the run and the evaluation are left unlocked."""
    from bayesmeta.config import DEFAULT_CONFIG
    from bayesmeta.experiment import Cell, run_cell

    cell = Cell("maml", "few", 0, tuple(TINY), ("eval.tasks=10",))
    first = run_cell(cell, DEFAULT_CONFIG, tmp_path, progress=False)
    eval_dir = tmp_path / "runs" / cell.run_name / "evals" / "few"
    assert first.metrics["eval_tasks"] == 10 and not first.reused
    assert registry.load_config(eval_dir / "config.toml").eval.tasks == 10
    assert run_cell(cell, DEFAULT_CONFIG, tmp_path, progress=False).reused
    assert not list(tmp_path.rglob(LOCK_OWNER)) and not list(tmp_path.rglob(".staging-*"))
