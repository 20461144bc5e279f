"""The extension API: a user's family and method by import path, registered names, installed plugins
(entry points), the protocols they are checked against, and every option on record."""

from __future__ import annotations

import json
import logging
import re
import tomllib
from dataclasses import dataclass
from typing import ClassVar

import jax
import numpy as np
import pytest

import bayesmeta
import bayesmeta.io
from bayesmeta import registry
from bayesmeta.cli import main
from bayesmeta.config import ConfigError
from bayesmeta.method import Requires, Spec
from bayesmeta.tasks import Classification, DenseGrid, ExactPredictive, Family, GroundTruth, Hypotheses
from tests import plugin_example

PLUGIN = [
    "task.family='tests.plugin_example:Quadratic'",
    "task.shots=5",
    "model.method='tests.plugin_example:PolyRidge'",
    "train.steps=300",
    "train.log_every=100",
    "train.eval_every=100",
    "train.checkpoint_every=100",
    "train.meta_batch=8",
    "eval.tasks=40",
    "eval.batch=20",
    "eval.samples=2",
    "eval.inner_steps=[1]",
    "eval.memorization_tasks=20",
    "eval.plot_tasks=2",
]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_a_plugin_family_and_method_by_import_path_go_through_every_command(tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="bayesmeta")
    assert main(["fit", *sets(*PLUGIN), "--run-dir", str(run_dir), "--no-progress"]) == 0
    # without a progress bar, one log line per train.eval_every steps
    steps = [r.getMessage().split(",")[0] for r in caplog.records if "step" in r.getMessage()]
    assert steps == [f"default: step {s}/300" for s in (100, 200, 300)]
    recorded = tomllib.loads((run_dir / "config.toml").read_text())
    assert recorded["task"]["family"] == "tests.plugin_example:Quadratic"
    assert recorded["model"]["params"] == {"degree": 2, "ridge": 0.1}  # the defaults, on record
    assert recorded["task"]["params"]["noise_sd"] == 0.05
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the exact model class (a quadratic) with a learned prior: the typical task near the noise floor
    # (0.05^2), where predicting the prior mean's function leaves the coefficients' variance (~0.5)
    assert metrics["metrics"]["mse@1"]["median"] < 0.02
    assert "support_dependence@1" in metrics["diagnostics"]  # the family's ground truth was used
    assert main(["evaluate", str(run_dir), *sets("eval.tasks=20"), "--no-progress"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["eval_tasks"] == 20
    assert main(["sample", str(run_dir), "--samples", "3", "--out", str(tmp_path / "s")]) == 0
    assert list((tmp_path / "s").glob("*.nc"))
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "summary.md").read_text().count("poly_ridge") >= 1
    capsys.readouterr()


def test_registered_names_work_like_built_ins(monkeypatch):
    monkeypatch.setattr(registry.families, "added", {})
    monkeypatch.setattr(registry.methods, "added", {})
    registry.register_family("quadratic", plugin_example.Quadratic)
    registry.register_method("poly_ridge")(plugin_example.PolyRidge)  # as a decorator
    assert "quadratic" in registry.families.names() and "poly_ridge" in registry.methods.names()
    cfg = registry.load_config(None, ["task.family='quadratic'", "model.method='poly_ridge'"])
    assert cfg.model.params == {"degree": 2, "ridge": 0.1}
    registry.register_family("quadratic", plugin_example.Quadratic)  # the same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        registry.register_family("quadratic", registry.families.get("sinusoid"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("maml", plugin_example.PolyRidge)


class NoSample:
    @dataclass(frozen=True)
    class Params:
        pass

    def check(self) -> None:
        return None


class BadRequires(Spec):
    requires: ClassVar[Requires] = {"net.depth": ("4",)}

    @staticmethod
    def build(*args: object) -> None:
        return None


class TypoRequires(Spec):
    requires: ClassVar[Requires] = {"likelihood": ("gausian",)}

    @staticmethod
    def build(*args: object) -> None:
        return None


class NoParams:
    @staticmethod
    def build(*args: object) -> None:
        return None

    @staticmethod
    def check(*args: object) -> None:
        return None


def test_objects_that_break_the_protocols_are_refused_in_one_line():
    with pytest.raises(TypeError, match="lacks sample"):
        registry.register_family("broken", NoSample)
    with pytest.raises(TypeError, match="Params, requires, check or build"):
        registry.register_method("broken", NoParams)
    with pytest.raises(
        TypeError, match=r"its requires names 'net.depth', which is not a \[model\] setting with choices"
    ):
        registry.register_method("broken", BadRequires)
    with pytest.raises(TypeError, match=r"its requires gives 'likelihood' \['gausian'\]; expected some of"):
        registry.register_method("broken", TypoRequires)
    cases = {
        "task.family='tests.no_such_module:X'": "task.family: cannot import 'tests.no_such_module'",
        "task.family='tests.plugin_example:Missing'": "has no attribute 'Missing'",
        "task.family='tests.test_extension:NoSample'": "is not a bayesmeta family: it lacks sample",
        "model.method='tests.test_extension:NoParams'": "model.method: .* is not a bayesmeta method",
        "task.family='quadratics'": "task.family: expected one of .*'sinusoid'.* or an import path",
        "model.method=':PolyRidge'": "model.method: expected an import path",
        "eval.task.family='nowhere:X'": "eval.task.family: cannot import 'nowhere'",
        "task.params.degree=3": r"task.params.degree: unknown key",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            registry.load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("model.method='mtnet'", "model.net.kind='conv4'"),
            "model.net.kind: method 'mtnet' supports 'mlp'; got 'conv4'",
        ),
        (
            ("model.method='protonet'", "model.likelihood='gaussian'"),
            "model.likelihood: method 'protonet' supports 'categorical'",
        ),
        (
            ("model.method='alpaca'", "model.noise='heteroscedastic'"),
            "model.noise: method 'alpaca' supports 'fixed', 'learned'",
        ),
        (
            ("model.method='arml'", "model.likelihood='categorical'"),
            "model.likelihood: method 'arml' supports 'gaussian'",
        ),
        (
            ("model.method='bmaml'", "model.remat='sqrt'"),
            "model.remat: method 'bmaml' supports 'none', 'nothing_saveable'",
        ),
    ],
)
def test_a_setting_outside_what_a_method_declares_is_refused_naming_the_key_and_the_choices(
    overrides, message
):
    with pytest.raises(ConfigError, match=re.escape(message)):
        registry.load_config(None, list(overrides))


def test_every_built_in_method_passes_the_protocol_check_a_plugin_gets():
    for name in registry.methods.builtins():
        assert registry._method_problem(registry.methods.get(name)) is None, name


def test_an_installed_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """A distribution's entry points (as pip installs them) name the family and the method."""
    dist = tmp_path / "bayesmeta_quadratic-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bayesmeta-quadratic\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[bayesmeta.families]\nquad = tests.plugin_example:Quadratic\n\n"
        "[bayesmeta.methods]\nridge = tests.plugin_example:PolyRidge\n"
        "broken = tests.plugin_example:nothing_here\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "quad" in registry.families.names() and "ridge" in registry.methods.names()
    cfg = registry.load_config(None, ["task.family='quad'", "model.method='ridge'"])
    assert registry.families.get(cfg.task.family) is plugin_example.Quadratic
    with pytest.raises(ConfigError, match=r"model.method: entry point .*nothing_here.* cannot load it"):
        registry.load_config(None, ["model.method='broken'"])


def test_the_resolved_config_lists_every_option_of_family_and_method():
    cfg = registry.load_config(None, ["model.method='maml'"])
    spec = registry.method_spec("maml")
    assert set(cfg.model.params) == {
        f for f in spec.Params.__dataclass_fields__ if getattr(spec.Params(), f) is not None
    }
    assert cfg.task.params["amplitude"] == [0.1, 5.0]
    # and a config written from it loads back to the same config
    again = registry.load_config(
        None, [f"model.params.{k}={json.dumps(v)}" for k, v in cfg.model.params.items()]
    )
    assert again == cfg


def test_families_declare_their_capabilities():
    get = lambda family, *over: registry.make_family(  # noqa: E731
        registry.load_config(None, [f"task.family='{family}'", *over]).task
    )
    sinusoid, basis, mixture = get("sinusoid"), get("basis_regression"), get("sine_line")
    for fam in (sinusoid, basis, mixture):
        assert isinstance(fam, Family) and isinstance(fam, GroundTruth) and isinstance(fam, DenseGrid)
        assert not isinstance(fam, Classification)
    assert isinstance(basis, ExactPredictive) and not isinstance(sinusoid, ExactPredictive)
    assert isinstance(mixture, Hypotheses) and not isinstance(sinusoid, Hypotheses)
    x = jax.numpy.linspace(-5, 5, 50)
    lines_and_sines = jax.numpy.stack([0.5 * x + 1, 2 * jax.numpy.sin(x - 1)])
    assert mixture.hypothesis(lines_and_sines, x).tolist() == [0, 1]


def test_a_plugin_option_is_bounded_like_a_built_in_one():
    with pytest.raises(ConfigError, match=r"model.params.degree: expected an integer >= 0 and <= 8, got 9"):
        registry.load_config(None, ["model.method='tests.plugin_example:PolyRidge'", "model.params.degree=9"])


def test_the_python_api_predicts_evaluates_and_refuses_bad_arrays(tmp_path):
    cfg = registry.load_config(None, [*PLUGIN, "eval.inner_steps=[1, 2]"])
    bayesmeta.train(cfg, tmp_path / "run", progress=False)
    run = bayesmeta.open_run(tmp_path / "run")
    assert run.cfg == cfg and "prior_mean" in run.params
    x_s = np.linspace(-2, 2, 5)[:, None]
    x_q = np.linspace(-2, 2, 7)
    dt = run.predict(x_s, 0.5 * x_s**2 - x_s, x_q, samples=4)  # a vector of scalar inputs is accepted
    pp = dt["posterior_predictive"]
    assert pp["y"].dims == ("chain", "draw", "point", "output") and pp["y"].shape == (1, 4, 7, 1)
    assert dt.attrs["inner_steps"] == 2  # the last of eval.inner_steps
    np.testing.assert_allclose(pp["f"].values[0, 0, :, 0], 0.5 * x_q**2 - x_q, atol=0.05)
    assert np.std(pp["y"].values) > 0  # draws of the observation, not only the mean
    for args, message in [
        ((x_s, x_s[:4], x_q), r"y_support: expected an array of shape \(5, 1\), got \(4, 1\)"),
        ((np.ones((5, 2)), x_s, x_q), r"x_support: expected an array of shape \(n, 1\)"),
        ((x_s, x_s * np.nan, x_q), "y_support: holds NaN"),
        ((x_s, x_s, x_q[:0]), "x_query: expected at least one point"),
    ]:
        with pytest.raises(ValueError, match=message):
            run.predict(*args)
    first = run.sample(task_seed=1, samples=3, out=tmp_path / "s")
    second = run.sample(x_s, 0.5 * x_s**2, x_q, samples=3, out=tmp_path / "s")
    names = [p.name for p in first + second]
    assert names == ["sample_001.nc", "sample_001.png", "sample_002.nc", "sample_002.png"]
    metrics = run.evaluate(["eval.tasks=20"])
    assert metrics["eval_tasks"] == 20 and set(metrics["metrics"]) == {"mse@1", "mse@2"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_tasks"] == 20
    with pytest.raises(bayesmeta.io.RunFolderError, match="not a run folder"):
        bayesmeta.open_run(tmp_path)


def test_the_installed_package_has_no_bare_models_import_name(tmp_path):
    """models/ installs as bayesmeta.models; outside the checkout no top-level `models` exists."""
    import subprocess
    import sys

    code = "import importlib.util as u; print(u.find_spec('models'), u.find_spec('bayesmeta.models').name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "bayesmeta.models"], out.stderr


def test_a_declared_sampler_replaces_predictive():
    """A method that declares `sampler` gets its own draws back from predict.predictive, sliced to the
    requested sites, with the query labels withheld."""
    import jax.numpy as jnp

    from bayesmeta.likelihoods import Gaussian
    from bayesmeta.method import Method, no_guide
    from bayesmeta.predict import predictive
    from bayesmeta.tasks import TaskBatch

    seen = {}

    def sampler(params, batch, key, inner_steps, num_samples):
        seen["y_query"], seen["steps"] = batch.y_query, inner_steps
        f = jnp.full((num_samples, *batch.x_query.shape[:2], 1), params["c"])
        return {"f": f, "y": f + 1.0}

    method = Method("const", no_guide, no_guide, likelihood=Gaussian(1.0), sampler=sampler)
    batch = TaskBatch(
        jnp.zeros((2, 3, 1)), jnp.zeros((2, 3, 1)), jnp.zeros((2, 4, 1)), jnp.ones((2, 4, 1)), {}
    )
    out = predictive(method, 5, 7, ("f",))({"c": jnp.asarray(2.0)}, batch, jax.random.PRNGKey(0))
    assert set(out) == {"f"} and out["f"].shape == (7, 2, 4, 1)
    np.testing.assert_allclose(out["f"], 2.0)
    assert seen["y_query"] is None and seen["steps"] == 5
