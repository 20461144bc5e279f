"""Inner loops: truncated gradient descent phi = theta - sum_t alpha_t grad L(phi_t, D) (MAML, Finn 2017).

Grant et al. (2018) read this as the posterior mode of phi under an implicit Gaussian prior centred at
theta, which `tests/test_adapt.py` checks to machine precision on linear regression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Params = dict[str, Any]
TaskLoss = Callable[[Params, jax.Array, jax.Array], jax.Array]


def split(params: Params, adapt: str) -> tuple[Params, Params]:
    """(fast, slow): the layers the inner loop adapts ("all" or "head") and the rest."""
    if adapt == "all":
        return params, {}
    if adapt == "head":
        return {"head": params["head"]}, {k: v for k, v in params.items() if k != "head"}
    raise ValueError(f"adapt: expected 'all' or 'head', got {adapt!r}")


def step_sizes(lr: float | Params, fast: Params, steps: int) -> Params:
    """Per-step rates as a pytree over `fast` with a leading steps axis (scalar, per layer or Meta-SGD)."""
    if isinstance(lr, dict):
        return lr
    return jax.tree.map(lambda p: jnp.full((steps,), lr, jnp.result_type(p)), fast)


def gradient_descent(
    loss: TaskLoss,
    theta: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    steps: int,
    lr: float | Params,
    adapt: str = "all",
    first_order: bool = False,
    remat: str = "none",
) -> tuple[Params, jax.Array]:
    """Adapt one task: `steps` steps of GD on loss(params, x, y) from theta; returns (phi, losses).

    Second-order by default (the meta-gradient flows through the inner gradients); `first_order` stops
    the gradient through them, so d phi / d theta = I (first-order MAML). `remat` names a
    jax.checkpoint policy for the scan body: the backward pass then keeps only each step's carry and
    recomputes the rest, so memory grows with the parameters, not the step's internals, per step.
    """
    fast, slow = split(theta, adapt)

    def body(fast: Params, rates: Params) -> tuple[Params, jax.Array]:
        value, grads = jax.value_and_grad(lambda f: loss({**slow, **f}, x, y))(fast)
        if first_order:
            grads = lax.stop_gradient(grads)
        return jax.tree.map(lambda p, g, a: p - a * g, fast, grads, rates), value

    rates = step_sizes(lr, fast, steps)
    if remat == "sqrt":
        fast, losses = _segmented_scan(body, fast, rates, steps)
    else:
        if remat != "none":
            body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, remat))
        fast, losses = lax.scan(body, fast, rates, length=steps)
    return {**slow, **fast}, losses


def _segmented_scan(body: Any, carry: Params, rates: Params, steps: int) -> tuple[Params, jax.Array]:
    """sqrt(n) checkpointing: an outer scan over ~sqrt(steps) segments, each a rematerialised inner
    scan of rematerialised steps, so the backward pass holds ~2 sqrt(steps) carries, not `steps`.
    Padding steps (to fill the last segment) leave the carry unchanged."""
    seg = max(1, math.ceil(math.sqrt(steps)))
    n_seg = math.ceil(steps / seg) if steps else 0
    pad = n_seg * seg - steps
    live = jnp.arange(n_seg * seg) < steps
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]), rates)
    xs = jax.tree.map(lambda a: a.reshape(n_seg, seg, *a.shape[1:]), (padded, live.reshape(-1)))
    step = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)

    def masked(c: Params, inp: tuple) -> tuple[Params, jax.Array]:
        r, keep = inp
        new, value = step(c, r)
        return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, c), value

    segment = jax.checkpoint(
        lambda c, inp: lax.scan(masked, c, inp), policy=jax.checkpoint_policies.nothing_saveable
    )
    carry, losses = lax.scan(segment, carry, xs)
    return carry, losses.reshape(-1)[:steps]


def adapt_tasks(
    loss: TaskLoss, theta: Params, x: jax.Array, y: jax.Array, **kwargs: Any
) -> tuple[Params, jax.Array]:
    """`gradient_descent` vmapped over the leading task axis of x and y."""
    return jax.vmap(lambda xi, yi: gradient_descent(loss, theta, xi, yi, **kwargs))(x, y)


def adapt_each(
    loss: TaskLoss, thetas: Params, x: jax.Array, y: jax.Array, **kwargs: Any
) -> tuple[Params, jax.Array]:
    """`gradient_descent` from a different initialisation per task (thetas with a leading task axis)."""
    return jax.vmap(lambda th, xi, yi: gradient_descent(loss, th, xi, yi, **kwargs))(thetas, x, y)


def inner_loop(
    cfg: Any,
    loss: TaskLoss,
    theta: Params,
    x: jax.Array,
    y: jax.Array,
    inner_steps: int | None = None,
    *,
    first_order: bool | None = None,
    adapt: str | None = None,
    per_task: bool = False,
) -> tuple[Params, jax.Array]:
    """The configured inner loop ([model] inner_steps, inner_lr, adapt, first_order) on every task's
    support set; `inner_steps` overrides the training count (test time), `per_task` takes one theta
    per task (leading axis)."""
    steps = cfg.inner_steps if inner_steps is None else inner_steps
    return (adapt_each if per_task else adapt_tasks)(
        loss,
        theta,
        x,
        y,
        steps=steps,
        lr=cfg.inner_lr,
        adapt=cfg.adapt if adapt is None else adapt,
        first_order=cfg.first_order if first_order is None else first_order,
        remat=cfg.remat,
    )
