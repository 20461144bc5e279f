"""`bayesmeta sample`: posterior predictive functions from a file or a family task; bad files."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from bayesmeta import registry, run
from bayesmeta.cli import main
from bayesmeta.fit import fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from bayesmeta import config
    from tests.conftest import SMALL

    run_dir = tmp_path_factory.mktemp("run")
    cfg = registry.load_config(
        None,
        [
            *SMALL,
            "task.family='sine_line'",
            "task.shots=5",
            "model.method='platipus'",
            "model.noise_sd=0.3",
            "train.steps=100",
            "train.eval_every=100",
        ],
    )
    # `sample` needs only the resolved config and a checkpoint: train without the final evaluation
    (run_dir / "config.toml").write_text(config.dumps(cfg))
    setup = run.Setup.from_config(cfg)
    fit(setup.method, setup.family, cfg.train, seed=cfg.seed, run_dir=run_dir, progress=False)
    return run_dir


def test_sample_from_a_family_task(fitted, tmp_path, capsys):
    assert main(["sample", str(fitted), "--samples", "7", "--task-seed", "3", "--out", str(tmp_path)]) == 0
    with xr.open_datatree(tmp_path / "sample_001.nc", engine="h5netcdf") as dt:
        f = dt["posterior_predictive"]["f"]
        assert f.dims == ("chain", "draw", "point", "output") and f.shape == (1, 7, 200, 1)
        assert float(f.std("draw").mean()) > 0  # PLATIPUS draws different functions
        np.testing.assert_array_equal(f["x"], dt["constant_data"]["x_query"].values[:, 0])
        assert np.all(np.diff(f["x"].values) > 0)  # the grid, as coordinate of every point
        assert dt["constant_data"]["x_support"].shape == (5, 1) and "truth" in dt["constant_data"]
        assert all("description" in v.attrs for g in dt.children.values() for v in g.data_vars.values())
    assert (tmp_path / "sample_001.png").stat().st_size > 0


def test_each_sample_call_writes_new_files(fitted, tmp_path, capsys):
    """Two calls leave two pairs of files; a name whose PNG is left over is skipped, not overwritten."""
    out = tmp_path / "s"
    for seed in ("1", "2"):
        assert main(["sample", str(fitted), "--samples", "2", "--task-seed", seed, "--out", str(out)]) == 0
    (out / "sample_003.png").write_bytes(b"mine")
    assert main(["sample", str(fitted), "--samples", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_001.nc",
        "sample_001.png",
        "sample_002.nc",
        "sample_002.png",
        "sample_003.png",
        "sample_004.nc",
        "sample_004.png",
    ]
    assert (out / "sample_003.png").read_bytes() == b"mine"
    supports = []
    for n in (1, 2):
        with xr.open_datatree(out / f"sample_00{n}.nc", engine="h5netcdf") as dt:
            supports.append(dt["constant_data"]["y_support"].values)
    assert not np.array_equal(*supports)  # each file keeps its own call's task
    assert capsys.readouterr().out.split()[-2:] == [str(out / "sample_004.nc"), str(out / "sample_004.png")]


def test_sample_from_csv_and_npz(fitted, tmp_path):
    (tmp_path / "s.csv").write_text("x,y\n-2.0,1.5\n3.0,-0.5\n")
    assert (
        main(["sample", str(fitted), "--support", str(tmp_path / "s.csv"), "--out", str(tmp_path / "a")]) == 0
    )
    with xr.open_datatree(tmp_path / "a" / "sample_001.nc", engine="h5netcdf") as dt:
        np.testing.assert_allclose(dt["constant_data"]["y_support"].values[:, 0], [1.5, -0.5])
    np.savez(tmp_path / "s.npz", x=np.array([0.0, 1.0, 2.0]), y=np.array([0.0, 1.0, 2.0]))
    np.savez(tmp_path / "q.npz", x=np.linspace(-1, 1, 11)[:, None])
    assert (
        main(
            [
                "sample",
                str(fitted),
                "--support",
                str(tmp_path / "s.npz"),
                "--query",
                str(tmp_path / "q.npz"),
                "--samples",
                "4",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    with xr.open_datatree(tmp_path / "b" / "sample_001.nc", engine="h5netcdf") as dt:
        y = dt["posterior_predictive"]["y"]
        assert y.shape == (1, 4, 11, 1)
        np.testing.assert_allclose(y["x"], np.linspace(-1, 1, 11), rtol=1e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1,2,3\n", "expected shape (K, 2) with K >= 1 (x, y: 2 numbers per row), got (1, 3)"),
        ("x,y\n", "expected shape (K, 2) with K >= 1"),
        ("x,y\n1,abc\n", "line 2, column 2: 'abc' is not a number"),
    ],
)
def test_malformed_support_file_is_one_line(fitted, tmp_path, capsys, content, message):
    (tmp_path / "bad.csv").write_text(content)
    assert main(["sample", str(fitted), "--support", str(tmp_path / "bad.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_missing_support_file_and_npz_without_y(fitted, tmp_path, capsys):
    assert main(["sample", str(fitted), "--support", str(tmp_path / "nope.csv")]) == 1
    assert "nope.csv: not found" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", x=np.zeros(3))
    assert main(["sample", str(fitted), "--support", str(tmp_path / "x.npz")]) == 1
    assert "expected arrays x and y" in capsys.readouterr().err
