"""2D point navigation (Finn et al. 2017, section 5.3) in JAX, rollouts of a Gaussian policy, and the
policy-gradient estimators MAML-RL's inner and outer loops use.

    state s_t in R^2, s_0 = 0 (fixed start); goal g ~ U[-0.5, 0.5]^2 per task
    s_{t+1} = s_t + clip(b a_t, -b, b), b = 0.1        (rllab's normalize: [-1, 1] -> [-b, b], clipped)
    r_t = -||s_{t+1} - g||^2  (the paper; "distance": -||s_{t+1} - g||, the reference code)
    horizon H = 100; no early termination (static shapes: the reference stops within 0.01 of the goal)

Policy: a ~ N(mu_theta(s), diag exp(2 log_std)), mu an MLP, log_std a free vector (rllab: std 1 at
init). Policy gradient with a linear feature baseline (Duan et al. 2016, supplement; rllab, and the
reference code's LinearFeatureBaseline): features [s, s^2, t/100, (t/100)^2, (t/100)^3, 1], fitted by
ridge regression to the discounted returns-to-go of the same batch of trajectories.

Estimators of grad J(theta), J = E sum_t gamma^t r_t, from n trajectories of pi_theta:
    g_hat = (1/n) sum_i sum_t gamma^t grad log pi(a_it | s_it) (G_it - b_it),
    G_it = sum_{t'>=t} gamma^(t'-t) r_it'
"reinforce": the surrogate (1/n) sum_i sum_t log pi(a_it|s_it) stop(gamma^t (G_it - b_it)): its gradient is
  g_hat, its Hessian misses the score-function terms of the sampling distribution (what the original
  MAML code differentiated; Rothfuss et al. 2019, ProMP, Section 4).
"dice": DiCE (Foerster et al. 2018) with its baseline term: (1/n) sum_i sum_t [box(sum_{t'<=t} log pi_it')
  gamma^t r_it + (1 - box(log pi_it)) gamma^t b_it], box(x) = exp(x - stop(x)). Same value of the gradient
  (g_hat), and every higher derivative is an unbiased estimate of the derivative of J, so differentiating
  through an inner step theta + alpha g_hat gives the MAML meta-gradient grad J(theta + alpha grad J(theta))
  with the curvature of J estimated without bias (ProMP's "formulation II").
Both are divided by H (the references average their losses over all n H steps, which sets the scale of
alpha) and, when `normalize`, by stop(sd of the weighted advantages) (the reference normalizes the
advantages): positive constant factors, so unbiasedness of the direction and DiCE's property hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bayesmeta.config import opt
from bayesmeta.nets import MLP
from bayesmeta.tasks.base import TaskBatch, range_problem, uniform

# ----------------------------------------------------------------------------------------------------
# The environment and its task family


@dataclass(frozen=True)
class PointNavigation:
    """The 2D point environment of one task: `task` is the task's info, {"goal": (2,)}."""

    horizon: int = 100
    action_bound: float = 0.1
    reward: str = "squared"
    obs_dim: int = 2
    act_dim: int = 2

    def reset(self, task: dict) -> jax.Array:
        """s_0 = (0, 0), the fixed start."""
        return jnp.zeros((2,), task["goal"].dtype)

    def observe(self, state: jax.Array) -> jax.Array:
        """The observation is the position."""
        return state

    def step(self, task: dict, state: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """s' = s + clip(b a, -b, b); r = -||s' - g||^2 (or -||s' - g|| for reward = "distance")."""
        b = self.action_bound
        new = state + jnp.clip(b * action, -b, b)
        sq = jnp.sum(jnp.square(new - task["goal"]))
        return new, -(sq if self.reward == "squared" else jnp.sqrt(sq))


@dataclass(frozen=True)
class Navigation:
    """Task family of 2D navigation: goals uniform on goal_range^2, one per task (Finn et al. 2017, 5.3).

    A TaskBatch carries the goals in info["goal"] (T, 2), and, so that the batch has the engine's shape,
    as x_support = x_query (T, 1, 2) with zero y_support (T, 1, 2); the data of a task are the rollouts its
    method collects (bayesmeta.tasks.Environment)."""

    @dataclass(frozen=True)
    class Params:
        goal_range: tuple[float, ...] = opt((-0.5, 0.5), doc="goals uniform on [low, high]^2")
        horizon: int = opt(100, ge=1, doc="steps per episode")
        action_bound: float = opt(0.1, gt=0, doc="actions in [-1, 1] scale to, and are clipped at, +-bound")
        reward: str = opt(
            "squared", choices=["squared", "distance"], doc="minus the squared or plain distance"
        )

    params: Any
    shots: int = 1
    queries: int = 1
    x_dim: int = 2
    y_dim: int = 2

    @property
    def environment(self) -> PointNavigation:
        p = self.params
        return PointNavigation(p.horizon, p.action_bound, p.reward)

    def check(self) -> str | None:
        return range_problem(self.params, "goal_range")

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        goal = uniform(key, (n_tasks, 2), self.params.goal_range)
        x = goal[:, None, :]
        return TaskBatch(x, jnp.zeros_like(x), x, jnp.zeros_like(x), {"goal": goal})


# ----------------------------------------------------------------------------------------------------
# Policy and rollouts


@dataclass(frozen=True)
class GaussianPolicy:
    """a ~ N(mu(s), diag exp(2 log_std)): mu an MLP (net), log_std a parameter vector (init 0: std 1)."""

    net: MLP

    def init(self, key: jax.Array) -> dict:
        return {**self.net.init(key), "log_std": jnp.zeros((self.net.out_dim,), jnp.float32)}

    def log_prob(self, params: dict, obs: jax.Array, act: jax.Array) -> jax.Array:
        """log N(act; mu(obs), exp(2 log_std)) summed over action dims; obs (..., d_o) -> (...)."""
        mu = self.net.apply(params, obs.reshape(-1, obs.shape[-1])).reshape(*obs.shape[:-1], -1)
        z = (act - mu) * jnp.exp(-params["log_std"])
        return jnp.sum(-0.5 * jnp.square(z) - params["log_std"] - 0.5 * jnp.log(2 * jnp.pi), -1)

    def sample(self, params: dict, obs: jax.Array, key: jax.Array) -> jax.Array:
        mu = self.net.apply(params, obs[None])[0]
        return mu + jnp.exp(params["log_std"]) * jax.random.normal(key, mu.shape)


class Trajectories(NamedTuple):
    """n trajectories of horizon H: obs (n, H, d_o) seen before each action, act (n, H, d_a), rew (n, H),
    and the positions after each step (n, H, d_o) for plots."""

    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array


def rollout(
    env: Any, policy: GaussianPolicy, params: dict, task: dict, key: jax.Array, n: int
) -> Trajectories:
    """n episodes of pi_params on one task (lax.scan over time, vmap over episodes); the samples are
    constants for differentiation (stop_gradient on params), as REINFORCE treats them."""
    params = lax.stop_gradient(params)

    def episode(k: jax.Array) -> Trajectories:
        def body(state: jax.Array, kt: jax.Array) -> tuple[jax.Array, tuple]:
            obs = env.observe(state)
            act = policy.sample(params, obs, kt)
            new, r = env.step(task, state, act)
            return new, (obs, act, r, env.observe(new))

        _, out = lax.scan(body, env.reset(task), jax.random.split(k, env.horizon))
        return Trajectories(*out)

    return jax.vmap(episode)(jax.random.split(key, n))


# ----------------------------------------------------------------------------------------------------
# Returns, baseline and estimators


def returns_to_go(rew: jax.Array, discount: float) -> jax.Array:
    """G_t = sum_{t' >= t} discount^(t' - t) r_t' along the last axis."""

    def body(g: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        g = r + discount * g
        return g, g

    _, g = lax.scan(body, jnp.zeros(rew.shape[:-1], rew.dtype), jnp.moveaxis(rew, -1, 0), reverse=True)
    return jnp.moveaxis(g, 0, -1)


def baseline_features(obs: jax.Array) -> jax.Array:
    """[s, s^2, t/100, (t/100)^2, (t/100)^3, 1] per step (Duan et al. 2016's linear feature baseline);
    obs (n, H, d) -> (n, H, 2d + 4)."""
    n, h, _ = obs.shape
    t = jnp.broadcast_to((jnp.arange(h, dtype=obs.dtype) / 100.0)[None, :, None], (n, h, 1))
    return jnp.concatenate([obs, obs**2, t, t**2, t**3, jnp.ones_like(t)], -1)


def linear_baseline(obs: jax.Array, target: jax.Array, reg: float = 1e-5, retries: int = 5) -> jax.Array:
    """b = X w, w = (X^T X + reg I)^-1 X^T G: ridge fit of the returns-to-go on the features of this batch
    (constant for differentiation). When the solve is not finite (X^T X singular in float32, e.g. when
    the policy keeps every trajectory in one place), reg grows tenfold up to `retries` times and the first
    finite solution is used, as the reference baseline does (pytorch-maml-rl's LinearFeatureBaseline)."""
    x = baseline_features(lax.stop_gradient(obs)).reshape(-1, 2 * obs.shape[-1] + 4)
    y = lax.stop_gradient(target).reshape(-1)
    xtx, xty, eye = x.T @ x, x.T @ y, jnp.eye(x.shape[1], dtype=x.dtype)
    regs = reg * 10.0 ** jnp.arange(retries + 1, dtype=x.dtype)
    ws = jax.vmap(lambda r: jnp.linalg.solve(xtx + r * eye, xty))(regs)
    finite = jnp.all(jnp.isfinite(ws), axis=1)
    w = ws[jnp.argmax(finite)]  # the first finite solution (the smallest reg's when none is)
    return (x @ w).reshape(target.shape)


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's box(x) = exp(x - stop(x)): value 1, derivative box(x) grad x (Foerster et al. 2018)."""
    return jnp.exp(x - lax.stop_gradient(x))


def surrogate(
    logp: jax.Array,
    rew: jax.Array,
    base: jax.Array,
    discount: float,
    estimator: str = "dice",
    normalize: bool = True,
) -> jax.Array:
    """The policy-gradient surrogate of a batch (module docstring): logp, rew, base (n, H) -> scalar
    whose gradient is g_hat / H = (1/(n H)) sum_i sum_t gamma^t grad log pi_it (G_it - b_it), over their
    sd if normalize (a mean over the n H steps, as the reference codes' losses, which fixes alpha's scale)."""
    w = discount ** jnp.arange(rew.shape[-1], dtype=rew.dtype)
    adv = lax.stop_gradient(w * (returns_to_go(rew, discount) - base))
    scale = lax.stop_gradient(jnp.std(adv) + 1e-8) if normalize else 1.0
    if estimator == "reinforce":
        value = jnp.sum(logp * adv, -1)
    elif estimator == "dice":
        value = jnp.sum(magic_box(jnp.cumsum(logp, -1)) * w * rew, -1) + jnp.sum(
            (1.0 - magic_box(logp)) * w * lax.stop_gradient(base), -1
        )
    else:
        raise ValueError(f"estimator: expected 'dice' or 'reinforce', got {estimator!r}")
    return jnp.mean(value) / (scale * rew.shape[-1])


@dataclass(frozen=True)
class PolicyGradient:
    """One task's policy-gradient machinery: environment, policy, n trajectories per batch, discount,
    estimator ("dice" / "reinforce"), advantage normalisation, ridge of the linear baseline."""

    env: Any
    policy: GaussianPolicy
    trajectories: int = 20
    discount: float = 0.99
    estimator: str = "dice"
    normalize: bool = True
    reg: float = 1e-5

    def objective(self, params: dict, traj: Trajectories) -> jax.Array:
        """The surrogate of `params` on trajectories sampled from (a copy of) them."""
        base = linear_baseline(traj.obs, returns_to_go(traj.rew, self.discount), self.reg)
        logp = self.policy.log_prob(params, traj.obs, traj.act)
        return surrogate(logp, traj.rew, base, self.discount, self.estimator, self.normalize)

    def sample(self, params: dict, task: dict, key: jax.Array) -> Trajectories:
        return rollout(self.env, self.policy, params, task, key, self.trajectories)

    def gradient(self, params: dict, task: dict, key: jax.Array) -> tuple[dict, Trajectories]:
        """(g_hat at params from a fresh batch, that batch)."""
        traj = self.sample(params, task, key)
        return jax.grad(self.objective)(params, traj), traj

    def adapt(
        self, params: dict, task: dict, key: jax.Array, steps: int, lr: float, first_order: bool = False
    ) -> tuple[dict, jax.Array, jax.Array]:
        """`steps` policy-gradient ascent steps phi <- phi + lr g_hat(phi), each on a fresh batch of
        trajectories (lax.scan); returns (phi, the mean return of each step's batch (steps,), the
        positions of each step's batch (steps, n, H, d_o))."""

        def body(phi: dict, k: jax.Array) -> tuple[dict, tuple]:
            g, traj = self.gradient(phi, task, k)
            if first_order:
                g = lax.stop_gradient(g)
            return jax.tree.map(lambda p, d: p + lr * d, phi, g), (mean_return(traj), traj.next_obs)

        phi, (ret, pos) = lax.scan(body, params, jax.random.split(key, steps))
        return phi, ret, pos


def mean_return(traj: Trajectories) -> jax.Array:
    """The undiscounted return sum_t r_t, averaged over the batch's episodes."""
    return jnp.mean(jnp.sum(traj.rew, -1))


def adaptation_returns(method: Any, params: dict, batch: TaskBatch, key: jax.Array, steps: int) -> dict:
    """Run a policy-gradient method's model at fitted `params` on `batch` with `steps` test-time
    adaptation steps (training = false) and return its recorded sites: "returns" (T, steps + 1), the
    mean return after 0..steps steps, and "positions" (T, steps + 1, n, H, 2)."""
    from numpyro import handlers

    model = handlers.substitute(handlers.seed(method.model, key), data=params)
    tr = handlers.trace(model).get_trace(batch, inner_steps=steps, training=False)
    return {k: tr[k]["value"] for k in ("returns", "positions")}
