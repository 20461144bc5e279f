"""Multi-process training on JAX's distributed runtime: one process per host (or per CPU socket), the
global meta-batch sharded over every process's devices, the run folder written by process 0 alone."""

from __future__ import annotations

from typing import Any

import jax


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """jax.distributed.initialize, with CPU collectives over gloo (XLA's CPU backend has none of its
    own); unset arguments come from JAX_COORDINATOR_ADDRESS or a cluster JAX detects (SLURM, Open MPI)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_primary() -> bool:
    """The process that writes the run folder, prints and evaluates: process 0 (the only one alone)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """A pytree of replicated global arrays as this process's own copies (single-device arrays that
    numpy, checkpoints and local evaluation can read); unchanged in a single-process run."""
    if jax.process_count() == 1:
        return tree

    def local(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:
                raise ValueError(f"to_host: a sharded array of shape {a.shape} is not replicated")
            return a.addressable_data(0)
        return a

    return jax.tree.map(local, tree)
