"""MAML-RL (Finn et al. 2017, section 5.3) and MAML+L2F (Baik et al. 2020, section 4.3) as empirical
Bayes over policies, on a task family of MDPs (bayesmeta.tasks.Environment).

    theta (policy initialisation), g (L2F's attenuator)      meta-parameters (numpyro.param)
    L2F only: gamma_i = sigmoid(g(e_i)), e_i = layer means of g_hat_i(theta) on an extra batch from pi_theta;
              phi_i^0 = gamma_i * theta (models/l2f.py's pieces); MAML: phi_i^0 = theta
    phi_i^{k+1} = phi_i^k + alpha g_hat_i(phi_i^k), each step on n fresh trajectories of pi_{phi_i^k}
    factor: mean_i S_i(phi_i^K), the policy-gradient surrogate on n trajectories of pi_{phi_i^K}

Rollouts are drawn inside the model from numpyro.prng_key() (seeded by SVI). SVI with the empty guide
ascends the factor, so the meta-gradient is grad_theta mean_i S_i(phi_i^K(theta)) through the inner
steps. With estimator = "dice" (default) the inner surrogate is DiCE's, so the second derivatives in
that chain include the score-function terms of the inner rollouts and estimate the Hessian of the
expected return without bias (ProMP's formulation II); "reinforce" drops them (the original MAML code);
model.first_order = true stops the gradient through the inner gradients (first-order MAML). The outer
rollouts' own sampling distribution is handled by the outer surrogate's score function (REINFORCE).

Prediction (training = false) records "returns" (T, K + 1): the mean undiscounted return of the batch
drawn after 0, 1, ..., K adaptation steps, and "positions" (T, K + 1, n, H, 2) for trajectory plots.
model.inner_steps = 0 in training is the "pretrained" baseline of MAML's paper (plain policy gradient
on the average return over tasks); fine-tuning it at test time takes the same policy-gradient steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro

from bayesmeta.config import ConfigError, ModelConfig, opt
from bayesmeta.method import Context, Method, Requires, Spec, no_guide
from bayesmeta.models.l2f import attenuate, attenuator, attenuator_init, layer_means
from bayesmeta.nets import make_net
from bayesmeta.rl.navigation import GaussianPolicy, PolicyGradient, mean_return
from bayesmeta.sites import param_tree
from bayesmeta.tasks import TaskBatch


def build_maml_rl(cfg: ModelConfig, p: MAMLRL.Params, context: Context, l2f: bool) -> Method:
    env = context.environment
    if env is None:
        raise ConfigError(
            f"model.method: {cfg.method!r} collects rollouts and needs a task family of MDPs "
            "(one that declares bayesmeta.tasks.Environment)"
        )
    policy = GaussianPolicy(make_net(cfg.net, env.obs_dim, env.act_dim))
    pg = PolicyGradient(env, policy, p.trajectories, p.discount, p.estimator, p.normalize, p.baseline_reg)
    n_layers = len(jax.tree.leaves(jax.eval_shape(policy.init, jax.random.PRNGKey(0))))
    pre_init = math.log(p.gamma_init / (1 - p.gamma_init))

    def initialisations(theta: dict, tasks: dict, keys: jax.Array) -> dict:
        """phi_i^0 = gamma_i * theta per task (T leading), gamma_i from its policy gradient at theta."""
        g = param_tree("l2f.attenuator", lambda key: attenuator_init(n_layers, pre_init, key))

        def embed(task: dict, key: jax.Array) -> jax.Array:
            grads = pg.gradient(theta, task, key)[0]
            return layer_means(jax.lax.stop_gradient(grads) if cfg.first_order else grads)

        gamma = numpyro.deterministic("gamma", jax.nn.sigmoid(attenuator(g, jax.vmap(embed)(tasks, keys))))
        return jax.vmap(lambda gi: attenuate(theta, "all", gi))(gamma)

    def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
        theta = param_tree("theta", policy.init)
        steps = cfg.inner_steps if inner_steps is None else inner_steps
        key = numpyro.prng_key()
        if key is None:
            raise ValueError(f"{cfg.method}: the model draws rollouts; run it under numpyro.handlers.seed")
        n_tasks = batch.x_support.shape[0]
        k_embed, k_inner, k_outer = (jax.random.split(k, n_tasks) for k in jax.random.split(key, 3))
        init = initialisations(theta, batch.info, k_embed) if l2f else theta

        def one(phi0: dict, task: dict, k_in: jax.Array, k_out: jax.Array) -> tuple:
            phi, ret, pos = pg.adapt(phi0, task, k_in, steps, cfg.inner_lr, cfg.first_order)
            traj = pg.sample(phi, task, k_out)
            ret = jnp.concatenate([ret, mean_return(traj)[None]])
            return pg.objective(phi, traj), ret, jnp.concatenate([pos, traj.next_obs[None]])

        axes = (0 if l2f else None, 0, 0, 0)
        objective, returns, positions = jax.vmap(one, in_axes=axes)(init, batch.info, k_inner, k_outer)
        numpyro.deterministic("returns", returns)
        if not training:
            numpyro.deterministic("positions", positions)
        numpyro.factor("objective", jnp.mean(objective))

    return Method(name=cfg.method, model=model, guide=no_guide, likelihood=None)


@dataclass(frozen=True)
class MAMLRL(Spec):
    """MAML with a policy-gradient inner loop on an MDP family."""

    @dataclass(frozen=True)
    class Params:
        trajectories: int = opt(20, ge=2, doc="episodes per policy-gradient batch (inner step and outer)")
        discount: float = opt(0.99, gt=0, le=1, doc="discount gamma of the returns-to-go")
        estimator: str = opt(
            "dice",
            choices=["dice", "reinforce"],
            doc="inner surrogate: DiCE (unbiased second derivatives) or plain REINFORCE (original MAML code)",
        )
        normalize: bool = opt(True, doc="divide each surrogate by the sd of its batch's advantages")
        baseline_reg: float = opt(1e-5, gt=0, doc="ridge of the linear feature baseline's fit")
        gamma_init: float = opt(0.9, gt=0, doc="L2F only: gamma at initialisation, in (0, 1)")

    l2f: ClassVar[bool] = False
    # the policy is an MLP and its policy-gradient steps adapt every parameter
    requires: ClassVar[Requires] = {"net.kind": ("mlp",), "adapt": ("all",)}

    @staticmethod
    def check(cfg: ModelConfig, params: Params) -> str | None:
        if cfg.inner_clip != 0:
            clip = cfg.inner_clip
            return f"model.inner_clip: the policy-gradient inner loop does not clip; expected 0, got {clip:g}"
        if params.gamma_init >= 1:
            return f"model.params.gamma_init: expected < 1, got {params.gamma_init}"
        return None

    @classmethod
    def build(cls, cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        return build_maml_rl(cfg, params, context, cls.l2f)


class L2FRL(MAMLRL):
    """MAML+L2F: the initialisation attenuated per task by gamma_i from the task's policy gradient."""

    l2f = True
