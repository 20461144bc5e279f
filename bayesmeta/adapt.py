"""Inner loops: truncated gradient descent phi = theta - sum_t alpha_t grad L(phi_t, D) (MAML, Finn 2017).

Grant et al. (2018) read this as the posterior mode of phi under an implicit Gaussian prior centred at
theta, which `tests/test_adapt.py` checks to machine precision on linear regression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from bayesmeta.nets import keep_shared, shared_layout
from bayesmeta.sites import RATES, param_tree

Params = dict[str, Any]
TaskLoss = Callable[[Params, jax.Array, jax.Array], jax.Array]
Layout = Callable[[Params, int], tuple[Params, Any]]  # (theta, tasks) -> (theta, vmap axes)


def split(params: Params, adapt: str) -> tuple[Params, Params]:
    """(fast, slow): the layers the inner loop adapts ("all" or "head") and the rest."""
    if adapt == "all":
        return params, {}
    if adapt == "head":
        return {"head": params["head"]}, {k: v for k, v in params.items() if k != "head"}
    raise ValueError(f"adapt: expected 'all' or 'head', got {adapt!r}")


def step_sizes(lr: float | Params, fast: Params, steps: int) -> Params:
    """Per-step rates as a pytree over `fast` with a leading steps axis (scalar, per layer or Meta-SGD).

    A pytree of n rates per leaf serves any number of steps: step t uses rate min(t, n - 1), so steps
    beyond the n learned ones reuse the last learned rate (n = 1: the same rate at every step)."""
    if isinstance(lr, dict):
        return jax.tree.map(lambda a: extend_steps(a, steps), lr)
    return jax.tree.map(lambda p: jnp.full((steps,), lr, jnp.result_type(p)), fast)


def extend_steps(rates: jax.Array, steps: int) -> jax.Array:
    """rates (n, ...) -> (steps, ...): row t is rates[min(t, n - 1)] (the last row repeats)."""
    n = rates.shape[0]
    if n == steps:
        return rates
    return rates[jnp.minimum(jnp.arange(steps), n - 1)]


def learned_rates(fast: Params, kind: str, steps: int, init: float, prefix: str = RATES) -> Params:
    """Inner step sizes as meta-parameters (numpyro.param sites `prefix.layer.leaf`, unconstrained):
    "per_layer_step" one rate per parameter tensor and inner step, (steps,) per leaf (MAML++, Antoniou
    et al. 2019); "meta_sgd" one rate per parameter entry, shared by the steps, (1, *shape) (Meta-SGD,
    Li et al. 2017). All start at `init`; the result goes to `step_sizes` as `lr`."""
    if kind not in ("per_layer_step", "meta_sgd"):
        raise ValueError(f"learned rates: expected 'per_layer_step' or 'meta_sgd', got {kind!r}")

    def rates(p: jax.Array) -> jax.Array:
        return jnp.full((steps,) if kind == "per_layer_step" else (1, *p.shape), init, p.dtype)

    return param_tree(prefix, lambda _: jax.tree.map(rates, fast))


def clip_norm(g: Any, c: float) -> Any:
    """g scaled by min(1, c / ||g||), the global norm over the pytree; c = 0 leaves g as it is."""
    if c == 0:
        return g
    norm = optax.tree.norm(g)
    return jax.tree.map(lambda a: a * jnp.minimum(1.0, c / jnp.maximum(norm, 1e-30)), g)


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
    clip: float = 0.0,
) -> tuple[Params, jax.Array]:
    """Adapt one task: `steps` steps of GD on loss(params, x, y) from theta, each gradient clipped to
    global norm `clip` (0: not clipped); returns (phi, losses).

    Second-order by default (the meta-gradient flows through the inner gradients); `first_order` stops
    the gradient through them, so d phi / d theta = I (first-order MAML). `remat` names a
    jax.checkpoint policy for the scan body: the backward pass then keeps only each step's carry and
    recomputes the rest, so memory grows with the parameters, not the step's internals, per step.
    """
    fast, slow = split(theta, adapt)

    def body(fast: Params, rates: Params) -> tuple[Params, jax.Array]:
        value, grads = jax.value_and_grad(lambda f: loss({**slow, **f}, x, y))(fast)
        grads = clip_norm(grads, clip)
        if first_order:
            grads = lax.stop_gradient(grads)
        return jax.tree.map(lambda p, g, a: p - a * g, fast, grads, rates), value

    rates = step_sizes(lr, fast, steps)
    if steps == 1:
        # One step runs without a scan: under vmap over tasks theta stays shared, so the step's forward
        # and backward are one GEMM over every task's points, where a scan carry is first broadcast to
        # one copy of theta per task (experiments/bench/maml_sinusoid.py: the engine's step went from
        # 1.21-1.24x the hand-written one to 1.00-1.07x). Longer loops keep the single scan: peeling
        # their first step off was no faster in ad-hoc timings and compiled the step's body twice.
        if remat != "none":  # "sqrt" of one step: the step itself, rematerialised
            policy = "nothing_saveable" if remat == "sqrt" else remat
            body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, policy))
        fast, loss0 = body(fast, jax.tree.map(lambda r: r[0], rates))
        return {**slow, **fast}, loss0[None]
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
    loss: TaskLoss,
    theta: Params,
    x: jax.Array,
    y: jax.Array,
    layout: Layout = keep_shared,
    **kwargs: Any,
) -> tuple[Params, jax.Array]:
    """`gradient_descent` vmapped over the leading task axis of x and y, from the one theta (laid out
    for the vmap by `layout`, nets.shared_layout)."""
    tree, axes = layout(theta, x.shape[0])
    return jax.vmap(lambda th, xi, yi: gradient_descent(loss, th, xi, yi, **kwargs), (axes, 0, 0))(tree, x, y)


def adapt_each(
    loss: TaskLoss, thetas: Params, x: jax.Array, y: jax.Array, **kwargs: Any
) -> tuple[Params, jax.Array]:
    """`gradient_descent` from a different initialisation per task (thetas with a leading task axis)."""
    return jax.vmap(lambda th, xi, yi: gradient_descent(loss, th, xi, yi, **kwargs))(thetas, x, y)


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop's settings, explicit: training steps, step size, which parameters adapt
    ("all" or "head"), first order (no second derivatives), the remat policy and the gradient clip."""

    steps: int
    lr: float
    adapt: str = "all"
    first_order: bool = False
    remat: str = "none"
    clip: float = 0.0
    layout: Layout = keep_shared

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> InnerLoop:
        """From [model] (inner_steps, inner_lr, adapt, first_order, remat, inner_clip, and the net's
        layout of a theta shared by the tasks), with keyword overrides."""
        kw = {
            "layout": shared_layout(cfg.net),
            "steps": cfg.inner_steps,
            "lr": cfg.inner_lr,
            "adapt": cfg.adapt,
            "first_order": cfg.first_order,
            "remat": cfg.remat,
            "clip": cfg.inner_clip,
        }
        return cls(**(kw | overrides))

    def __call__(
        self,
        loss: TaskLoss,
        theta: Params,
        x: jax.Array,
        y: jax.Array,
        inner_steps: int | None = None,
        *,
        per_task: bool = False,
        lr: float | Params | None = None,
        task_lr: bool = False,
        fixed: Params | None = None,
    ) -> tuple[Params, jax.Array]:
        """Adapt on every task's support set (x, y): `inner_steps` overrides the training count (test
        time), `per_task` takes one theta per task (leading axis), `lr` replaces the step size (e.g. by
        learned rates), `task_lr` says that lr has a leading task axis (a step size per task, e.g.
        MT-Net's sampled masks times alpha), and `fixed` (leading task axis) is merged into the
        parameters the loss reads without being adapted (e.g. a per-task FiLM modulation)."""
        kw = {
            "steps": self.steps if inner_steps is None else inner_steps,
            "adapt": self.adapt,
            "first_order": self.first_order,
            "remat": self.remat,
            "clip": self.clip,
        }
        lr = self.lr if lr is None else lr
        if not task_lr and fixed is None:
            if per_task:
                return adapt_each(loss, theta, x, y, lr=lr, **kw)
            return adapt_tasks(loss, theta, x, y, self.layout, lr=lr, **kw)

        def one(th: Params, rate: Any, const: Params | None, xi: jax.Array, yi: jax.Array) -> Any:
            task_loss = loss if const is None else (lambda p, a, b: loss({**p, **const}, a, b))
            return gradient_descent(task_loss, th, xi, yi, lr=rate, **kw)

        theta, theta_axes = (theta, 0) if per_task else self.layout(theta, x.shape[0])
        axes = (theta_axes, 0 if task_lr else None, None if fixed is None else 0, 0, 0)
        return jax.vmap(one, in_axes=axes)(theta, lr, fixed, x, y)


def unit(v: jax.Array) -> jax.Array:
    """v / ||v||, and 0 (with a zero gradient, no NaN) where v = 0."""
    sq = jnp.sum(jnp.square(v))
    return jnp.where(sq > 0, v / jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def trajectory_correction(theta: Params, phi: Params, gamma: float) -> Params:
    """phi_hat_i = phi_i - gamma grad_phi_i Omega_i, Omega_i = -d_i . theta_mu, d_i = unit(phi_i - theta),
    theta_mu = mean_i d_i over the tasks (leading axis of phi), all leaves flattened into one vector
    (the landscape paper's regularizer, METHODS 6, Algorithm 1).

    theta_mu is held constant in grad Omega_i: grad Omega_i = -(theta_mu - (d_i . theta_mu) d_i) / ||phi_i -
    theta||. Differentiating theta_mu's own d_i / T gives the same (its term is -J_i^T d_i / T = 0, as
    |d_i| = 1), so the choice is immaterial; the meta-gradient flows through everything, theta_mu
    included. The step scales as gamma / ||phi_i - theta||. A task with phi_i = theta is not moved."""
    flat_theta, unravel = ravel_pytree(theta)
    flat_phi = jax.vmap(lambda p: ravel_pytree(p)[0])(phi)
    mean_dir = jnp.mean(jax.vmap(lambda p: unit(p - flat_theta))(flat_phi), 0)
    grad_omega = jax.vmap(jax.grad(lambda p: -unit(p - flat_theta) @ mean_dir))(flat_phi)
    return jax.vmap(unravel)(flat_phi - gamma * grad_omega)
