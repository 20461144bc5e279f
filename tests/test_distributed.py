"""Multi-process training on JAX's distributed runtime, over loopback: two processes (one CPU device
each, collectives over gloo) run one `bayesmeta fit`, follow one process's loss trajectory on the same
global meta-batch, write the run folder from process 0 alone, and resume from their own checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from bayesmeta import registry
from bayesmeta.cli import main
from bayesmeta.fit import fit
from bayesmeta.run import Setup

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "train.meta_batch=8",
    "train.log_every=15",
    "train.eval_every=15",
    "train.checkpoint_every=15",
    "model.net.hidden=[16, 16]",
    "eval.tasks=10",
    "eval.inner_steps=[1]",
]
RUN = "from bayesmeta.cli import main; raise SystemExit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_two_processes(run_dir: Path, steps: int, resume: bool = False) -> list[str]:
    """`bayesmeta fit --distributed` as processes 0 and 1 on 127.0.0.1, train.devices = 2 (one each)."""
    port = free_port()
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    sets = [a for s in [*SETTINGS, f"train.steps={steps}", "train.devices=2"] for a in ("--set", s)]
    cmd = [sys.executable, "-c", RUN, "fit", *sets, "--run-dir", str(run_dir), "--no-progress"]
    cmd += ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    cmd += ["--resume"] if resume else []
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_follow_one_process_and_resume_from_their_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    fit_two_processes(run_dir, steps=30)
    first = np.load(run_dir / "checkpoint" / "state.npz")["loss"]
    outs = fit_two_processes(run_dir, steps=60, resume=True)
    assert "run folder:" in outs[0] and "run folder:" not in outs[1]  # process 0 reports and writes
    assert (run_dir / "metrics.json").is_file() and not list(run_dir.glob("**/*.tmp"))
    saved = np.load(run_dir / "checkpoint" / "state.npz")
    cfg = registry.load_config(None, [*SETTINGS, "train.steps=60"])
    setup = Setup.from_config(cfg)
    one = fit(setup.method, setup.family, cfg.train, seed=cfg.seed, progress=False)
    np.testing.assert_allclose(saved["loss"], np.asarray(one.trace.loss), rtol=1e-5)
    np.testing.assert_array_equal(saved["loss"][:30], first)
    assert int(saved["step"]) == 60


def test_process_flags_need_distributed(tmp_path, capsys):
    assert main(["fit", "--process-id", "1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "need --distributed" in capsys.readouterr().err
