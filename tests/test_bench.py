"""The benchmark scripts of experiments/bench run end to end in their smoke modes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bayesmeta.bench import load_script

ROOT = Path(__file__).parents[1]


def rates(tree: dict, path: str = "") -> dict[str, float]:
    """Every value whose key ends in "_per_s", by its path in the results."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= rates(v, f"{path}/{k}")
        elif k.endswith("_per_s"):
            out[f"{path}/{k}"] = v
    return out


def test_the_rl_benchmark_smoke_writes_positive_finite_rates(tmp_path):
    # the smoke checks the pipeline, not the speed: it inherits conftest.py's cheapest XLA compile
    script = ROOT / "experiments" / "bench" / "rl" / "run.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["smoke"] and res["command"].endswith(f"--smoke --out {tmp_path}")
    r = res["results"]
    tasks = [str(t) for t in res["sizes"]["tasks"]]
    for by_tasks in r["environment"].values():
        assert list(by_tasks) == tasks
    assert set(r["meta_rl"]) == {"MAML-RL", "MAML+L2F"}
    assert set(r["dynamics_models"]) == {"GrBAL", "ReBAL"}
    assert len(r["mpc"]) == 2
    found = rates(r)
    # env steps (2 families x tasks), meta-RL (iterations, tasks, env steps), dynamics (iterations,
    # tasks), MPC (steps, model predictions)
    assert len(found) == 2 * len(tasks) + 2 * 3 + 2 * 2 + 2 * 2, sorted(found)
    bad = {k: v for k, v in found.items() if not (isinstance(v, float) and math.isfinite(v) and v > 0)}
    assert not bad, bad
    rows = [*r["meta_rl"].values(), *r["dynamics_models"].values(), *r["mpc"].values()]
    rows += [row for by_tasks in r["environment"].values() for row in by_tasks.values()]
    for row in rows:
        assert row["compile_s"] > 0 and row["memory_mib"] > 0, row
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.count("\n|---") == 4 and "SMOKE TEST" in md and "- machine: " in md


def _cost_module():
    return load_script(ROOT / "experiments" / "bench" / "cost" / "run.py", "bench_cost")


def test_the_cost_model_recovers_known_scaling_exponents(tmp_path):
    """Time ~ 3 x^1.5 and memory ~ 2 x^0.5 give exponents 1.5 and 0.5; the table lists every point and
    the plot is written."""
    cost = _cost_module()
    xs = [2, 4, 8, 16]
    assert math.isclose(cost.exponent(xs, [3 * x**1.5 for x in xs]), 1.5, rel_tol=1e-9)
    pts = [
        {
            "compile_s": 1.0,
            "seconds_per_step": 3e-3 * x**1.5,
            "tasks_per_second": x / (3e-3 * x**1.5),
            "memory_mib": 2 * x**0.5,
            "temp_mib": x**0.5,
            "gflop_per_step": 0.1 * x,
            "gflops": 0.1 * x / (3e-3 * x**1.5),
        }
        for x in xs
    ]
    res = {
        "meta-batch": {
            "second order": {
                "x": xs,
                "points": pts,
                "time_exponent": cost.exponent(xs, [p["seconds_per_step"] for p in pts]),
                "memory_exponent": cost.exponent(xs, [p["memory_mib"] for p in pts]),
            }
        }
    }
    assert "| meta-batch | second order | 1.50 | 0.50 | 2-16 |" in cost.exponents(res)
    assert cost.table(res, peak=10.0).count("| meta-batch |") == len(xs)
    assert cost.plot(res, tmp_path / "cost.png").stat().st_size > 0
