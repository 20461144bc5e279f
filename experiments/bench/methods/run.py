"""Benchmark: meta-training throughput of every regression method through the engine's training loop.

    .venv/bin/python experiments/bench/methods/run.py [--repeats 5]

For each method: compile time of one scanned chunk of SVI steps (200; 20 for the conv4 Omniglot rows,
whose steps take a thousand times longer), tasks sampled on device; tasks per second (minimum time
over repeats), and XLA's memory analysis of the compiled chunk. Settings
follow each method's experiment: meta-batch 25, 5-shot sine/line tasks with 10 queries for the
probabilistic methods; the NME sinusoid with meta-batch 25 for the meta-regularized ones; ARML's 2-D
multi-family regression (10-shot, 5 inner steps) for the task-structured learners; Omniglot 5-way
1-shot (1 query per class, conv4 with 64 filters and max-pooling, the minimal background sets) for the
metric, memory and graph learners (matching, siamese, TADAM, MANN, SNAIL, GNN), beside ProtoNet.

The neural prior's NUTS reference is a cost of evaluation, not of training: its row times the ABML
inner loop it trains with; `measure_nuts` times its test-time predictive separately (tasks per second
of posterior predictive draws, NUTS per task with the default warmup and tree depth).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from bayesmeta import registry
from bayesmeta.bench import best_gemm_gflops, compile_timed, memory_mib, scanned_step, seconds
from bayesmeta.experiment import machine
from bayesmeta.fit import make_svi
from bayesmeta.io import write_json, write_text
from bayesmeta.predict import predictive
from bayesmeta.run import Setup
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
CHUNK = 200
CONV_CHUNK = 20  # a conv4 Omniglot step takes 0.1-1 s: 20 steps time it as steadily as 200 sinusoid steps
AMB = ("task.family='sine_line'", "task.shots=5", "model.noise_sd=0.3", "model.inner_steps=5")
NME = ("task.family='nme_sinusoid'",)
OMNI = (
    "task.family='omniglot'",
    "model.likelihood='categorical'",
    "task.params.ways=5",
    "task.shots=1",
    "task.queries=1",
    "model.net.kind='conv4'",
    "model.net.filters=64",
    "model.net.downsample='maxpool'",
)
MM = ("task.family='multimodal'", "model.inner_steps=5", "model.inner_lr=0.001")
CASES = {
    "MAML (sinusoid, 10-shot, 1 step)": ("model.method='maml'",),
    "FOMAML (sinusoid, 10-shot, 1 step)": ("model.method='fomaml'",),
    "MAML (sine/line, 5 steps)": (*AMB, "model.method='maml'"),
    "LLAMA, exact GGN (sine/line, 5 steps)": (*AMB, "model.method='llama'"),
    "PLATIPUS (sine/line, 5 steps)": (*AMB, "model.method='platipus'"),
    "BMAML, M=5 (sine/line, 5 steps)": (*AMB, "model.method='bmaml'", "model.params.particles=5"),
    "VERSA (sine/line)": (*AMB, "model.method='versa'"),
    "ALPaCA (sine/line)": (*AMB, "model.method='alpaca'"),
    "ALPaCA mixture, K=2 (sine/line)": (*AMB, "model.method='alpaca_mixture'"),
    "NP (sine/line)": (*AMB, "model.method='np'"),
    "HSML (sine/line, 5 steps)": (*AMB, "model.method='hsml'"),
    "ARML (sine/line, 5 steps)": (*AMB, "model.method='arml'"),
    "Neural prior, ABML inner loop (sine/line, 5 steps)": (*AMB, "model.method='neural_prior'"),
    "MR-MAML(W) (NME, 1 step)": (*NME, "model.method='mr_maml_w'"),
    "MR-MAML(A) (NME, 1 step)": (*NME, "model.method='mr_maml_a'"),
    "MAML (multimodal 2-D, 5 steps)": (*MM, "model.method='maml'"),
    "MT-Net (multimodal 2-D, 5 steps)": (*MM, "model.method='mtnet'"),
    "MUMOMAML, 2x40 BiLSTM (multimodal 2-D, 5 steps)": (*MM, "model.method='mumomaml'"),
    "TAML, Theil (multimodal 2-D, 5 steps)": (*MM, "model.method='taml'"),
    "CNP (NME)": (*NME, "model.method='cnp'", "model.net.hidden=[100, 100]"),
    "MR-CNP(W) (NME)": (*NME, "model.method='mr_cnp_w'", "model.net.hidden=[100, 100]"),
    "ProtoNet (Omniglot 5-way 1-shot)": (*OMNI, "model.method='protonet'"),
    "TADAM (Omniglot 5-way 1-shot)": (*OMNI, "model.method='tadam'"),
    "Matching networks (Omniglot 5-way 1-shot)": (*OMNI, "model.method='matching'"),
    "Matching networks, FCE (Omniglot 5-way 1-shot)": (
        *OMNI,
        "model.method='matching'",
        "model.params.fce=true",
    ),
    "Siamese network (Omniglot 5-way 1-shot)": (*OMNI, "model.method='siamese'"),
    "MANN, 200 units, 128x40 memory (Omniglot 5-way 1-shot)": (*OMNI, "model.method='mann'"),
    "SNAIL (Omniglot 5-way 1-shot)": (*OMNI, "model.method='snail'"),
    "GNN, 2 layers (Omniglot 5-way 1-shot)": (*OMNI, "model.method='gnn'"),
}


def chunk_steps(overrides: tuple[str, ...]) -> int:
    """SVI steps per timed chunk: fewer for the conv4 rows."""
    return CONV_CHUNK if "model.net.kind='conv4'" in overrides else CHUNK


def measure(overrides: tuple[str, ...], repeats: int) -> dict[str, float]:
    steps = chunk_steps(overrides)
    cfg = registry.load_config(None, ["train.meta_batch=25", *overrides])
    compile_s, per_step, compiled = scanned_step(cfg, steps, repeats)
    return {
        "compile_s": compile_s,
        "steps": steps,
        "ms_per_step": per_step * 1e3,
        "tasks_per_s": 25 / per_step,
        "temp_mib": memory_mib(compiled)["temp_mib"],
    }


NUTS_CASE = (*AMB, "model.method='neural_prior'")
NUTS_TASKS, NUTS_DRAWS = 25, 10


def measure_nuts(overrides: tuple[str, ...], repeats: int) -> dict[str, float]:
    """The NUTS posterior predictive at the initial prior: compile time and tasks per second for
    NUTS_TASKS tasks and NUTS_DRAWS draws each (minimum time over repeats)."""
    cfg = registry.load_config(None, [f"train.meta_batch={NUTS_TASKS}", *overrides])
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    batch = setup.family.sample(jax.random.PRNGKey(1), NUTS_TASKS)
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))
    key = jax.random.PRNGKey(2)
    run = predictive(setup.method, cfg.model.inner_steps, NUTS_DRAWS, ("f",))
    compile_s, compiled = compile_timed(run, params, batch, key)
    best = min(seconds(lambda: compiled(params, batch, key), repeats))
    return {"compile_s": compile_s, "tasks_per_s": NUTS_TASKS / best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    began = time.perf_counter()
    res = {name: measure(over, args.repeats) for name, over in CASES.items()}
    table = markdown_table(
        ["method", "steps per chunk", "compile s", "ms per step", "tasks per second", "XLA temp MiB"],
        [
            [
                n,
                r["steps"],
                f"{r['compile_s']:.1f}",
                f"{r['ms_per_step']:.3f}",
                f"{r['tasks_per_s']:,.0f}",
                f"{r['temp_mib']:.1f}",
            ]
            for n, r in res.items()
        ],
    )
    nuts = measure_nuts(NUTS_CASE, args.repeats)
    table += (
        f"\n\nTest-time NUTS predictive of the neural prior (sine/line, {NUTS_TASKS} tasks, "
        f"{NUTS_DRAWS} draws each): compile {nuts['compile_s']:.1f} s, "
        f"{nuts['tasks_per_s']:.2f} tasks per second."
    )
    gemm = best_gemm_gflops()
    minutes = (time.perf_counter() - began) / 60
    print(table)
    cmd = f".venv/bin/python experiments/bench/methods/run.py --repeats {args.repeats}"
    write_text(
        HERE / "RESULTS.md",
        (
            "# Benchmark: meta-training throughput of each method (meta-batch 25)\n\n"
            "One scanned chunk of SVI steps with tasks sampled on device, as `bayesmeta fit` runs it "
            f"({CHUNK} steps; {CONV_CHUNK} for the conv4 Omniglot rows); minimum over {args.repeats} "
            f"repeats.\n\n{table}\n\n- command: `{cmd}` ({minutes:.1f} min)\n"
            f"- machine: {machine()}; best float32 GEMM in the same run {gemm:.1f} GFLOP/s (jitted square "
            "matmuls of 1024 and 2048), to compare runs across machines and days\n"
        ),
    )
    write_json(
        HERE / "results.json",
        {
            "command": cmd,
            "machine": machine(),
            "gemm_gflops": gemm,
            "minutes": minutes,
            "results": res,
            "nuts_predictive": nuts,
        },
    )


if __name__ == "__main__":
    main()
