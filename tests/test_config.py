"""Bad configs: one line naming the key and what is allowed, a non-zero exit, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bayesmeta import config, registry
from bayesmeta.cli import main
from bayesmeta.config import ConfigError


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=0.1", ("train.lrr: unknown key; allowed keys: steps, meta_batch, ", "optimizer, lr, ")),
        ("train.steps=1.5", "train.steps: expected an integer >= 1 and <= 1000000000, got 1.5"),
        ("train.steps=0", "train.steps: expected an integer >= 1 and <= 1000000000, got 0"),
        ("train.lr=-1", "train.lr: expected a number > 0, got -1"),
        (
            "train.optimizer='rmsprop'",
            "train.optimizer: expected one of 'adam', 'adamw', 'sgd', got 'rmsprop'",
        ),
        ("model.method='nope'", ("model.method: expected one of ", "'maml'", "'platipus'", "got 'nope'")),
        ("model.first_order=1", "model.first_order: expected true or false, got 1"),
        (
            "model.net.hidden=[40, -2]",
            "model.net.hidden[1]: expected an integer >= 1 and <= 1000000000, got -2",
        ),
        ("task.family='cubic'", ("task.family: expected one of ", "'sinusoid'", "got 'cubic'")),
        ("task.params.amplitude=[5.0, 1.0]", "task.params.amplitude: expected [low, high] with low <= high"),
        ("task.params.wobble=2", "task.params.wobble: unknown key; allowed keys: amplitude, phase"),
        ("train.eval_every=150", "train.eval_every: expected a multiple of train.log_every (100), got 150"),
        ("eval.task.params.split='val'", "eval.task.params.split: unknown key"),
        ("model.params.beta=1", "model.params.beta: unknown key"),
    ],
)
def test_cli_names_the_bad_key(override, expected, capsys, tmp_path):
    code = main(["fit", "--set", override, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in err, err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_bad_file_and_bad_toml(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    assert main(["fit", str(bad)]) == 2
    assert "bad.toml: not valid TOML" in capsys.readouterr().err


def test_no_traceback_from_the_installed_command(tmp_path):
    """The real process prints one line on stderr and exits 2."""
    out = subprocess.run(
        [sys.executable, "-m", "bayesmeta.cli", "fit", "--set", "train.meta_batch=0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "bayesmeta: config error: train.meta_batch: expected an integer >= 1 and <= 1000000000, got 0"
    )


def test_overrides_parse_as_toml_and_eval_task_inherits():
    cfg = registry.load_config(
        None, ["task.shots=5", "model.net.hidden=[8, 8, 8]", "name=x-y+1", "eval.task.queries=50"]
    )
    assert cfg.task.shots == 5 and cfg.model.net.hidden == (8, 8, 8) and cfg.name == "x-y+1"
    assert cfg.eval.task.shots == 5 and cfg.eval.task.queries == 50  # inherited + overridden
    # a different evaluation family does not inherit the training family's params
    cfg = registry.load_config(
        None, ["task.family='nme_sinusoid'", "task.params.n_train=4", "eval.task.family='sinusoid'"]
    )
    assert "n_train" not in cfg.eval.task.params  # the sinusoid's own defaults, on record
    assert cfg.eval.task.params["amplitude"] == [0.1, 5.0]


def test_resolved_config_round_trips(tmp_path):
    cfg = registry.load_config(None, ["task.family='nme_sinusoid'", "eval.task.params.split='test'"])
    path = tmp_path / "c.toml"
    path.write_text(config.dumps(cfg))
    assert registry.load_config(path) == cfg


def test_a_problem_of_the_file_names_the_file_and_one_of_an_override_does_not(tmp_path):
    """registry.load_config: a value the file itself gets wrong is reported with the file's path (a
    truncated run config can end in a valid but wrong value); a bad override on a good file is not."""
    bad = tmp_path / "config.toml"
    bad.write_text("[train]\nlr = 0.0\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: train\.lr: expected a number > 0"):
        registry.load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text("[train]\nlr = 0.01\n")
    with pytest.raises(ConfigError, match=r"^train\.lr: expected a number > 0"):
        registry.load_config(good, ["train.lr=0"])
