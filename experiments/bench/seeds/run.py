"""Benchmark: K seeds of one configuration trained one after another vs together (fit.fit_seeds).

    .venv/bin/python experiments/bench/seeds/run.py [--seeds 5] [--repeats 3]

For each case (the NME sinusoid rows of Yin et al.'s Table 1, and conv MAML on Omniglot): the compile
time and the time of one scanned chunk of 200 SVI steps, for one seed (what each of K separate runs
pays, K times) and for K seeds as lanes of one vmapped computation (what `bayesmeta.experiment`'s
grids pay once); seed-steps per second of each and their ratio, and XLA's memory of each chunk.
Minimum time over repeats. This is issue #15's lever for Table 1 in under 15 minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bayesmeta import registry
from bayesmeta.bench import compile_timed, memory_mib, seconds
from bayesmeta.experiment import machine
from bayesmeta.fit import initial_state, make_chunk, make_svi
from bayesmeta.io import write_json, write_text
from bayesmeta.run import Setup
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
CHUNK = 200
NME = ("task.family='nme_sinusoid'", "train.meta_batch=25")
OMNI = (
    "task.family='omniglot'",
    "model.likelihood='categorical'",
    "task.params.ways=5",
    "task.shots=1",
    "task.queries=1",
    "model.net.kind='conv4'",
    "train.meta_batch=16",
)
CASES = {
    "MAML (NME sinusoid)": (*NME, "model.method='maml'", "model.adapt='all'"),
    "MR-MAML(W) (NME sinusoid)": (*NME, "model.method='mr_maml_w'"),
    "MR-MAML(A) (NME sinusoid)": (*NME, "model.method='mr_maml_a'"),
    "CNP (NME sinusoid)": (*NME, "model.method='cnp'", "model.net.hidden=[100, 100]"),
    "MAML (Omniglot 5-way 1-shot, conv4, meta-batch 16)": (*OMNI, "model.method='maml'"),
}


def chunk_for(overrides: tuple[str, ...], seeds: list[int]) -> tuple:
    """(the chunk function, the state, the data keys) of these seeds, stacked as lanes when there are
    several."""
    cfg = registry.load_config(None, list(overrides))
    setup = Setup.from_config(cfg)
    svis = [make_svi(setup.method, cfg.train, s) for s in seeds]
    inits = [initial_state(svi, setup.family, cfg.train, s) for svi, s in zip(svis, seeds, strict=True)]
    lanes = len(seeds) > 1
    stack = (lambda *a: jnp.stack(a)) if lanes else (lambda a: a)
    state = jax.tree.map(stack, *[i[0] for i in inits])
    keys = stack(*[i[1] for i in inits])
    return make_chunk(svis[0], setup.family, cfg.train.meta_batch, lanes=lanes), state, keys


def measure(overrides: tuple[str, ...], k: int, repeats: int) -> dict[str, float]:
    out = {}
    for label, seeds in (("alone", [0]), ("together", list(range(k)))):
        chunk, state, keys = chunk_for(overrides, seeds)
        start = jnp.asarray(0)
        compile_s, compiled = compile_timed(lambda s, i, k, c=chunk: c(s, i, CHUNK, k), state, start, keys)
        best = min(seconds(lambda c=compiled, s=state, i=start, k=keys: c(s, i, k), repeats))
        out[f"{label}_compile_s"] = compile_s
        out[f"{label}_seed_steps_per_s"] = len(seeds) * CHUNK / best
        out[f"{label}_memory_mib"] = memory_mib(compiled)["memory_mib"]
    out["speedup"] = out["together_seed_steps_per_s"] / out["alone_seed_steps_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    t0 = time.perf_counter()
    res = {name: measure(over, args.seeds, args.repeats) for name, over in CASES.items()}
    k = args.seeds
    table = markdown_table(
        [
            "case",
            "compile s, 1 seed",
            f"compile s, {k} together",
            "seed-steps/s, 1 seed",
            f"seed-steps/s, {k} together",
            "speedup",
            "XLA MiB, 1 seed",
            f"XLA MiB, {k} together",
        ],
        [
            [
                n,
                f"{r['alone_compile_s']:.1f}",
                f"{r['together_compile_s']:.1f}",
                f"{r['alone_seed_steps_per_s']:,.0f}",
                f"{r['together_seed_steps_per_s']:,.0f}",
                f"{r['speedup']:.2f}x",
                f"{r['alone_memory_mib']:.1f}",
                f"{r['together_memory_mib']:.1f}",
            ]
            for n, r in res.items()
        ],
    )
    print(table)
    cmd = f".venv/bin/python experiments/bench/seeds/run.py --seeds {k} --repeats {args.repeats}"
    took = time.perf_counter() - t0
    write_text(
        HERE / "RESULTS.md",
        (
            f"# Benchmark: {k} seeds one after another vs together (one vmapped computation)\n\n"
            f"One scanned chunk of {CHUNK} SVI steps, tasks sampled on device; minimum over {args.repeats} "
            f"repeats. Seed-steps per second counts every lane's steps; K separate runs also pay the "
            f"one-seed compile K times, the lanes once.\n\n{table}\n\n- command: `{cmd}`\n"
            f"- machine: {machine()}\n- took {took / 60:.1f} min\n"
        ),
    )
    write_json(HERE / "results.json", {"command": cmd, "machine": machine(), "results": res, "seconds": took})


if __name__ == "__main__":
    main()
