"""Model-predictive control with a dynamics model adapted online (Nagabandi et al. 2019, Alg. 2).

At every time step the model is adapted on the last M transitions D(t-M, t-1), a planner picks the
action sequence of least predicted cost over a horizon H, and the first action is executed (re-planning
every step). The model is any fitted method: `predictor(method, params, inner_steps)` turns a method and
its fitted parameters into f(support_x, support_y, query_x) -> the predictive mean at query_x after
adapting to the support set, through the engine's posterior predictive (bayesmeta.predict.predictive),
so GrBAL (MAML's gradient step), ReBAL (a recurrent update) and MB (no adaptation: zero steps) are the
same code. MB+DE (dynamic evaluation) instead carries the parameters through the episode and takes
gradient steps of the model's own negative log-likelihood on the last M transitions after each step.

    OnlineModel(init, update, predict): init a pytree carried through the episode, update(state, sx, sy)
    after each executed transition, predict(state, sx, sy, qx) -> predicted mean y at qx (n, y_dim).

Planners take the total predicted cost of candidate action sequences, `cost(actions (N, H)) -> (N,)`,
and return the best sequence they evaluated and its cost: random shooting (N uniform sequences) and
the cross-entropy method (CEM: iterations of N Gaussian sequences refitted to the E best).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer.util import log_density

from bayesmeta.method import Method
from bayesmeta.predict import predictive
from bayesmeta.tasks import TaskBatch

Predictor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Planner = Callable[[jax.Array, Callable[[jax.Array], jax.Array]], tuple[jax.Array, jax.Array]]


class OnlineModel(NamedTuple):
    """A dynamics model during an episode (module docstring)."""

    init: Any
    update: Callable[[Any, jax.Array, jax.Array], Any]
    predict: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def predictor(method: Method, params: dict, inner_steps: int) -> Predictor:
    """f(sx (M, x_dim), sy (M, y_dim), qx (n, x_dim)) -> (n, y_dim): the method's predictive mean (site
    "f", one draw) at qx after adapting to the support set with `inner_steps` steps, at fitted params."""
    run = predictive(method, inner_steps, 1, ("f",))

    def f(sx: jax.Array, sy: jax.Array, qx: jax.Array) -> jax.Array:
        batch = TaskBatch(sx[None], sy[None], qx[None], None, {})
        return run(params, batch, jax.random.PRNGKey(0))["f"][0, 0]

    return f


def adapting(f: Predictor) -> OnlineModel:
    """A model re-adapted from its meta-trained state at every step (GrBAL, ReBAL; MB with f unadapted)."""
    return OnlineModel((), lambda state, sx, sy: state, lambda state, sx, sy, qx: f(sx, sy, qx))


def window_nll(method: Method, params: dict, sx: jax.Array, sy: jax.Array) -> jax.Array:
    """-log p(sy | sx) of the method's model with no adaptation (inner_steps=0, training=False), the
    window as its query set: the mean-scaled NLL (for a Gaussian with sd^2 = 1/2, the MSE + const)."""
    batch = TaskBatch(sx[None], sy[None], sx[None], sy[None], {})
    model = partial(method.model, inner_steps=0, training=False)
    return -log_density(model, (batch,), {}, params)[0]


def dynamic_evaluation(method: Method, params: dict, lr: float, steps: int = 1) -> OnlineModel:
    """MB+DE (Nagabandi et al. 2019's baseline; Krause et al. 2018): the state is the parameters, started
    at the fitted ones; after each transition, `steps` SGD steps of `window_nll` on the last M
    transitions, kept for the rest of the episode; predictions use the current parameters unadapted.
    For empirical-Bayes methods (every latent a numpyro.param)."""
    f0 = predictive(method, 0, 1, ("f",))
    grad = jax.grad(lambda p, sx, sy: window_nll(method, p, sx, sy))

    def update(p: dict, sx: jax.Array, sy: jax.Array) -> dict:
        for _ in range(steps):
            p = jax.tree.map(lambda a, g: a - lr * g, p, grad(p, sx, sy))
        return p

    def predict(p: dict, sx: jax.Array, sy: jax.Array, qx: jax.Array) -> jax.Array:
        return f0(p, TaskBatch(sx[None], sy[None], qx[None], None, {}), jax.random.PRNGKey(0))["f"][0, 0]

    return OnlineModel(params, update, predict)


def best(candidates: jax.Array, costs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The candidate of least cost and that cost (NaN costs count as +inf)."""
    costs = jnp.where(jnp.isnan(costs), jnp.inf, costs)
    i = jnp.argmin(costs)
    return candidates[i], costs[i]


def random_shooting(n: int, horizon: int, low: float, high: float) -> Planner:
    """Planner: n action sequences (n, horizon) uniform in [low, high]; the best by predicted cost."""

    def plan(key: jax.Array, cost: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        candidates = jax.random.uniform(key, (n, horizon), minval=low, maxval=high)
        return best(candidates, cost(candidates))

    return plan


def cem(n: int, horizon: int, low: float, high: float, iterations: int = 3, elites: int = 20) -> Planner:
    """Planner: the cross-entropy method (Rubinstein 1999; as in Chua et al. 2018's MPC): n sequences
    ~ N(mu, sd^2) clipped to [low, high], mu, sd refitted to the `elites` best, `iterations` times from
    mu = mid-range, sd = half the range; returns the best sequence evaluated in any iteration."""

    def plan(key: jax.Array, cost: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        mu = jnp.full((horizon,), (low + high) / 2)
        sd = jnp.full((horizon,), (high - low) / 2)
        top, top_cost = mu, jnp.inf
        for k in jax.random.split(key, iterations):
            candidates = jnp.clip(mu + sd * jax.random.normal(k, (n, horizon)), low, high)
            c = cost(candidates)
            c = jnp.where(jnp.isnan(c), jnp.inf, c)
            elite = candidates[jnp.argsort(c)[:elites]]
            mu, sd = elite.mean(0), elite.std(0) + 1e-3
            b, bc = best(candidates, c)
            top, top_cost = jnp.where(bc < top_cost, b, top), jnp.minimum(bc, top_cost)
        return top, top_cost

    return plan


def predicted_cost(env: Any, predict: Callable[[jax.Array], jax.Array], s0: jax.Array) -> Callable:
    """actions (N, H) -> (N,): sum_h env.cost(s_{h+1}, a_h) along the model's rollout from s0, with
    s_{h+1} = env.apply_change(s_h, predict(env.features(s_h, a_h)))."""

    def cost(actions: jax.Array) -> jax.Array:
        def body(s: jax.Array, a: jax.Array) -> tuple:
            s_next = env.apply_change(s, predict(env.features(s, a)))
            return s_next, env.cost(s_next, a)

        s = jnp.broadcast_to(s0, (actions.shape[0], s0.shape[-1]))
        return jax.lax.scan(body, s, actions.T)[1].sum(0)

    return cost


class Episode(NamedTuple):
    """One MPC episode: states (T + 1, s_dim) from the first controlled state, actions (T,), the true
    cost of each step env.cost(s_{t+1}, u_t) (T,), the model's one-step prediction error on the
    executed transition, squared and summed over y's dimensions (T,), and what the next episode may
    continue from: the buffer of the last M transitions (x (M, x_dim), y (M, y_dim)) and the model state."""

    states: jax.Array
    actions: jax.Array
    cost: jax.Array
    model_error: jax.Array
    buffer: tuple[jax.Array, jax.Array]
    model_state: Any


def warmup(env: Any, dynamics: Any, s0: jax.Array, key: jax.Array, window: int) -> tuple:
    """`window` uniformly random actions from s0: (the state reached, the buffer (x, y) of those M
    transitions), to start an episode with a full window."""
    u = jax.random.uniform(key, (window,), minval=-env.max_torque, maxval=env.max_torque)
    states = env.rollout(dynamics, s0, u)
    return states[-1], (env.features(states[:-1], u), env.targets(states[:-1], states[1:]))


def episode(
    env: Any,
    schedule: Any,
    model: OnlineModel,
    planner: Planner,
    s0: jax.Array,
    key: jax.Array,
    buffer: tuple[jax.Array, jax.Array],
    model_state: Any = None,
) -> Episode:
    """Run MPC for T steps, T the leading axis of `schedule` (the true dynamics at each step, so they may
    change mid-episode), from state s0 with the last M transitions in `buffer` (from `warmup`, or a
    previous episode's) and the model state (None: model.init updated on the buffer). At each step:
    plan with the model adapted to the buffer, execute the first action, push the transition, update."""
    if model_state is None:
        model_state = model.update(model.init, *buffer)

    def body(carry: tuple, inp: tuple) -> tuple:
        s, bx, by, state = carry
        dyn, k = inp
        cost = predicted_cost(env, lambda qx: model.predict(state, bx, by, qx), s)
        plan, _ = planner(k, cost)
        u = plan[0]
        s_next = env.step(dyn, s, u)
        x, y = env.features(s, u), env.targets(s, s_next)
        err = jnp.sum(jnp.square(model.predict(state, bx, by, x[None])[0] - y))
        bx = jnp.concatenate([bx[1:], x[None]])
        by = jnp.concatenate([by[1:], y[None]])
        state = model.update(state, bx, by)
        return (s_next, bx, by, state), (s_next, u, env.cost(s_next, u), err)

    steps = jax.tree.leaves(schedule)[0].shape[0]
    carry = (s0, *buffer, model_state)
    (_, bx, by, state), (states, actions, costs, errs) = jax.lax.scan(
        body, carry, (schedule, jax.random.split(key, steps))
    )
    return Episode(jnp.concatenate([s0[None], states]), actions, costs, errs, (bx, by), state)


def replay(
    model: OnlineModel,
    buffer: tuple[jax.Array, jax.Array],
    xs: jax.Array,
    ys: jax.Array,
    model_state: Any = None,
) -> jax.Array:
    """The model's one-step prediction error on a given sequence of transitions (xs (T, x_dim), ys (T,
    y_dim)), online as in `episode` but without planning: at each t, sum_j (predict(state, D(t-M, t-1),
    x_t) - y_t)_j^2, then push (x_t, y_t) and update. (T,). So models are compared on the same
    transitions (e.g. one controller's trajectory) rather than each on its own."""
    if model_state is None:
        model_state = model.update(model.init, *buffer)

    def body(carry: tuple, xy: tuple) -> tuple:
        bx, by, state = carry
        x, y = xy
        err = jnp.sum(jnp.square(model.predict(state, bx, by, x[None])[0] - y))
        bx = jnp.concatenate([bx[1:], x[None]])
        by = jnp.concatenate([by[1:], y[None]])
        return (bx, by, model.update(state, bx, by)), err

    return jax.lax.scan(body, (*buffer, model_state), (xs, ys))[1]
