"""Data parallelism over tasks: 4 (forced CPU) devices follow 1 device's loss trajectory; bad device
counts are clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bayesmeta.cli import main

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import numpy as np
    import jax
    from bayesmeta import registry, run
    from bayesmeta.fit import fit
    assert len(jax.devices()) == 4
    losses = {}
    for d in (1, 4):
        cfg = registry.load_config(None, ["train.steps=100", "train.meta_batch=8", "train.log_every=50",
                                 "train.eval_every=50", "train.checkpoint_every=50",
                                 "model.net.hidden=[16, 16]", f"train.devices={d}"])
        setup = run.Setup.from_config(cfg)
        result = fit(setup.method, setup.family, cfg.train, seed=0, progress=False)
        losses[d] = np.asarray(result.trace.loss)
        devices = {len(v.sharding.device_set) for v in result.params.values()}
        assert devices == {d}, devices
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
    assert losses[1][-10:].mean() < losses[1][:10].mean()
    print("same trajectory", float(np.max(np.abs(losses[4] - losses[1]))))
""")


def test_four_devices_follow_the_one_device_trajectory():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same trajectory" in out.stdout


def test_device_count_errors_name_the_key(tmp_path, capsys):
    assert (
        main(
            [
                "fit",
                "--set",
                "train.devices=4",
                "--set",
                "train.meta_batch=10",
                "--run-dir",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "train.meta_batch: expected a multiple of train.devices (4), got 10" in capsys.readouterr().err
    assert (
        main(
            [
                "fit",
                "--set",
                "train.devices=64",
                "--set",
                "train.meta_batch=64",
                "--set",
                "train.steps=10",
                "--set",
                "train.log_every=10",
                "--set",
                "train.eval_every=10",
                "--set",
                "train.checkpoint_every=10",
                "--run-dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "train.devices: 64 requested" in err and "xla_force_host_platform_device_count=64" in err
