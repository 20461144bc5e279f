"""The run folder: an ArviZ DataTree with the named groups, metrics, summary and plots, via the CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import numpyro
import pytest
import xarray as xr

from bayesmeta import provenance
from bayesmeta.cli import main
from tests.conftest import SMALL


def test_fit_evaluate_report_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    sets = [a for s in SMALL for a in ("--set", s)]
    assert main(["fit", *sets, "--set", "eval.samples=2", "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mse@10 =" in out and str(run_dir) in out

    with xr.open_datatree(run_dir / "inference.nc", engine="h5netcdf") as dt:
        assert {
            "posterior",
            "point_estimates",
            "posterior_predictive",
            "observed_data",
            "log_likelihood",
            "constant_data",
            "predictions",
            "predictions_constant_data",
            "sample_stats",
        } <= set(dt.children)
        # MAML's meta-parameters are point estimates: their own group, not a one-draw posterior
        assert not dt["posterior"].data_vars
        theta = dt["point_estimates"]["theta_head_w"]
        assert theta.dims == ("theta_head_in", "theta_head_out") and theta.shape == (16, 1)
        assert theta.attrs["site"] == "theta.head.w"
        pp = dt["posterior_predictive"]
        assert pp["y"].dims == pp["f"].dims == ("chain", "draw", "inner_steps", "task", "point", "output")
        assert pp["y"].shape == (1, 2, 2, 40, 10, 1)
        assert list(pp["f"]["inner_steps"].values) == [1, 10]
        assert dt["observed_data"]["y"].dims == pp["y"].dims[2:]
        np.testing.assert_array_equal(pp["x"], dt["constant_data"]["x_query"].values[..., 0])
        assert set(dt["log_likelihood"].data_vars) == {"y_steps_1", "y_steps_10"}
        stats = dt["sample_stats"]
        assert stats["loss"].shape == (200,) and list(stats["eval_step"].values) == [100, 200]
        assert "eval_mse@10" in stats.data_vars
        loss = stats["loss"].values
        assert dt.attrs["method"] == "maml"
        # the stored predictive mean reproduces the reported metric
        f10 = pp["f"].sel(inner_steps=10).mean("draw").values[0]
        mse = np.mean((f10 - dt["observed_data"]["y"].sel(inner_steps=10).values) ** 2)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    np.testing.assert_allclose(metrics["metrics"]["mse@10"]["mean"], mse, rtol=1e-5)
    assert metrics["metrics"]["mse@10"]["n"] == 40
    # the largest one-step loss and its (1-based) step, kept where cell records keep it
    assert metrics["largest_loss"] == {"value": float(loss.max()), "step": int(np.argmax(loss)) + 1}
    # where the floats came from: a record that does not reproduce is told apart from a code change
    env = metrics["environment"]
    assert env["jax"] == jax.__version__ and env["numpyro"] == numpyro.__version__
    assert env["cpu"] == provenance.cpu_model() and set(env["cpu_features"]) <= set(provenance.ISA)
    for name in ("summary.md", "config.toml", "plots/training.png", "plots/predictions.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "| mse@10 |" in (run_dir / "summary.md").read_text()
    assert not list(run_dir.rglob("*.tmp"))  # atomic writes leave no temporaries

    assert main(["evaluate", str(run_dir), "--set", "eval.tasks=20", "--no-progress"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["mse@1"]["n"] == 20
    (run_dir / "summary.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "summary.md").is_file()


def test_report_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no inference file" in capsys.readouterr().err


def test_markdown_table_escapes_pipes_and_checks_row_widths():
    from bayesmeta.tables import markdown_table

    assert markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        markdown_table(["a", "b"], [[1]])


def test_cpu_features_are_read_from_the_flags(monkeypatch):
    info = {"model name": "Some CPU", "flags": "fpu sse2 avx2 fma avx512f avx512bw"}
    monkeypatch.setattr(provenance, "_cpuinfo", lambda: info)
    assert provenance.cpu_features() == ["avx2", "fma", "avx512f"]
    assert provenance.cpu_model() == "Some CPU"
    monkeypatch.setattr(provenance, "_cpuinfo", dict)
    assert provenance.cpu_features() == [] and provenance.cpu_model() == "model unknown"
