"""Experiment grids: finished runs are reused, a diverging run is reported and the grid goes on."""

from __future__ import annotations

import json

from bayesmeta.config import DEFAULT_CONFIG
from bayesmeta.experiment import Cell, run_grid
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
