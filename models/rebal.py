"""ReBAL, the recurrence-based adaptive learner (Nagabandi et al. 2019; survey 002, METHODS 9), as
empirical Bayes: a recurrent network reads the recent transitions in their order, and its state
conditions the dynamics model; the update rule is the LSTM's gating, learned, with no gradient steps.

    (h_t, c_t) = LSTM((x_t, y_t), h_{t-1}, c_{t-1}),  t = 1..M over the support set D_i, h_0 = c_0 = 0
    y*_i ~ N(g([x*, h_M]; theta), sd^2)      g = the MLP of model.net, reading the input beside h_M

The LSTM (`lstm`) and g (`theta`) are numpyro.param sites and the empty guide makes the ELBO the
scaled log-likelihood of the query sets: type-II maximum likelihood, as MAML here. model.inner_steps
and eval.inner_steps play no part (there is no inner loop): every test-time step count gives the same
prediction. Difference from the paper: there the recurrent model also steps through the K future
transitions it predicts; here the state after the M support transitions conditions all K predictions,
so ReBAL reads exactly the support set GrBAL's gradient step reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Requires, Spec, no_guide
from bayesmeta.nets import MLP, lstm_cell, lstm_init
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def lstm_state(p: dict, seq: jax.Array) -> jax.Array:
    """The LSTM's hidden state h_M after reading the sequence seq (M, d) from zero state."""
    n = p["wh"].shape[0]

    def step(carry: tuple, x: jax.Array) -> tuple:
        return lstm_cell(p, x, *carry), None

    zero = jnp.zeros((n,), seq.dtype)
    return lax.scan(step, (zero, zero), seq)[0][0]


@dataclass(frozen=True)
class ReBAL(Spec):
    """An LSTM over the support transitions; its last state conditions an MLP dynamics model."""

    @dataclass(frozen=True)
    class Params:
        hidden: int = opt(32, ge=1, doc="LSTM units: the size of the task state h_M the model reads")

    # an MLP dynamics model of (x, y) regression transitions
    requires: ClassVar[Requires] = {"net.kind": ("mlp",), "likelihood": ("gaussian",)}

    @staticmethod
    def build(
        cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context | None = None
    ) -> Method:
        lik = make_likelihood(cfg)
        h = params.hidden
        net = MLP(x_dim + h, lik.out_dim(y_dim), cfg.net.hidden, cfg.net.activation)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            lstm = param_tree("lstm", lambda k: lstm_init(k, x_dim + y_dim, h, h))
            theta = param_tree("theta", net.init)
            seq = jnp.concatenate([batch.x_support, batch.y_support], -1)
            state = jax.vmap(lambda s: lstm_state(lstm, s))(seq)  # (T, h)
            xq = batch.x_query
            ctx = jnp.broadcast_to(state[:, None, :], (*xq.shape[:2], h))
            observe(lik, net.apply(theta, jnp.concatenate([xq, ctx], -1)), batch.y_query)

        return Method(name="rebal", model=model, guide=no_guide, likelihood=lik)
