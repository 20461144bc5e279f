"""Neural process with a latent path (Garnelo et al. 2018, "Neural Processes"; METHODS 9), beside the
conditional NP of models/cnp.py. For a task with context C (the support set) and target T (the query):

    s(C)   = mean_j h([x_j, y_j])                   latent encoder, mean aggregation over pairs
    q(z|S) = N(mu(s(S)), sd(s(S))^2),  sd = 0.1 + 0.9 sigmoid(.)   (the NP papers' parameterisation)
    model   z ~ p(z | C) := q(z | C)                the same encoder on the context alone (the "prior")
            r = mean_j h_det([x_j, y_j]) over C     optional deterministic path (deterministic_path)
            y* ~ N(g_mu([z, r, x*]), sd*^2)         sd* by model.noise: fixed, learned, or heteroscedastic
                                                    0.1 + 0.9 softplus(g_sd(.)) (the NP papers' decoder)
    guide   z ~ q(z | C u T)                        reads the query labels (training only)

Weights, in the project's mean-over-points convention (sites.observe scales the likelihood to a mean
over tasks and query points): the site z is under plate(tasks) scaled by lambda / T, so

    loss = mean over tasks and query points of -log p(y* | z, x*)
           + lambda * mean over tasks i of KL(q(z | C_i u T_i) || p(z | C_i))

with lambda = kl_weight, unset = 1/K for K query points per task (read from the batch): then K * loss
is, per task, the negative NP ELBO sum_{t in T} log p(y_t | z, x_t) - KL, a bound on log p(y_T | x_T, C).
The target is the query set only (the engine's predictive p(y* | x*, D)); the original paper's targets
also contain the context points. TraceMeanField_ELBO computes the KL in closed form. At prediction the
guide cannot run (no query labels): predict_with_guide = False, and each predictive draw is one
z ~ p(z | C) decoded at the query inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import scale

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Requires, Spec
from bayesmeta.nets import MLP
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def latent_sd(raw: jax.Array) -> jax.Array:
    """sd of q(z | S) = 0.1 + 0.9 sigmoid(raw) (Kim et al. 2019's NP code)."""
    return 0.1 + 0.9 * jax.nn.sigmoid(raw)


def gaussian_kl(loc_q: jax.Array, sd_q: jax.Array, loc_p: jax.Array, sd_p: jax.Array) -> jax.Array:
    """KL(N(loc_q, sd_q^2) || N(loc_p, sd_p^2)) summed over the last axis."""
    per = jnp.log(sd_p / sd_q) + (jnp.square(sd_q) + jnp.square(loc_q - loc_p)) / (2 * jnp.square(sd_p)) - 0.5
    return jnp.sum(per, -1)


def kl_weight(p: NP.Params, n_query: int) -> float:
    """lambda: the option if set, else 1/K for K query points per task (the NP ELBO in mean-NLL units)."""
    return 1.0 / n_query if p.kl_weight is None else p.kl_weight


@dataclass(frozen=True)
class NP(Spec):
    """Neural process with a latent path (Garnelo et al. 2018): z ~ q(z | context and target) in
    training with KL to p(z | context) = q(z | context); at test z ~ p(z | context)."""

    @dataclass(frozen=True)
    class Params:
        z_dim: int = opt(8, ge=1, doc="dimension of the global latent z")
        r_dim: int = opt(32, ge=1, doc="dimension of the per-pair encodings (latent and deterministic)")
        encoder_hidden: tuple[int, ...] = opt((64, 64), ge=1, doc="hidden widths of the pair encoders")
        deterministic_path: bool = opt(
            False, doc="add the deterministic mean encoding r of the context to the decoder's input"
        )
        kl_weight: float | None = opt(
            None,
            gt=0,
            doc="lambda, the weight of KL(q(z|C u T) || p(z|C)) beside the mean query NLL; unset: 1/K for "
            "K query points per task, the exact ELBO",
        )

    requires: ClassVar[Requires] = {"likelihood": ("gaussian",)}

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = make_likelihood(cfg)
        act = cfg.net.activation
        pairs = MLP(x_dim + y_dim, p.r_dim, p.encoder_hidden, act)
        to_z = MLP(p.r_dim, 2 * p.z_dim, (p.r_dim,), act)
        det = MLP(x_dim + y_dim, p.r_dim, p.encoder_hidden, act)
        r_in = p.r_dim if p.deterministic_path else 0
        decoder = MLP(p.z_dim + r_in + x_dim, lik.out_dim(y_dim), cfg.net.hidden, act)

        def latent_init(key: jax.Array) -> dict:
            k1, k2 = jax.random.split(key)
            return {"pairs": pairs.init(k1), "to_z": to_z.init(k2)}

        def decoder_init(key: jax.Array) -> dict:
            k1, k2 = jax.random.split(key)
            out = {"decoder": decoder.init(k1)}
            return {**out, "det": det.init(k2)} if p.deterministic_path else out

        def latent(phi: dict, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
            """(loc, sd) of q(z | S), each (T, z_dim), for the sets S = (x, y) of T tasks."""
            s = jnp.mean(pairs.apply(phi["pairs"], jnp.concatenate([x, y], -1)), 1)
            out = to_z.apply(phi["to_z"], s)
            return out[..., : p.z_dim], latent_sd(out[..., p.z_dim :])

        def sample_z(loc: jax.Array, sd: jax.Array, lam: float) -> jax.Array:
            """z_i ~ N(loc_i, sd_i^2) under plate(tasks), scaled to lambda / T (model and guide alike)."""
            with numpyro.plate("z_tasks", loc.shape[0]), scale(scale=lam / loc.shape[0]):
                return numpyro.sample("z", dist.Normal(loc, sd).to_event(1))

        def decode(theta: dict, z: jax.Array, batch: TaskBatch) -> jax.Array:
            """The decoder's outputs at the query inputs (T, K, lik.out_dim(y_dim)): the mean of y* (and
            the raw sd of a heteroscedastic likelihood)."""
            x_q = batch.x_query
            parts = [jnp.broadcast_to(z[:, None], (*x_q.shape[:2], p.z_dim))]
            if p.deterministic_path:
                xy = jnp.concatenate([batch.x_support, batch.y_support], -1)
                r = jnp.mean(det.apply(theta["det"], xy), 1)
                parts.append(jnp.broadcast_to(r[:, None], (*x_q.shape[:2], p.r_dim)))
            return decoder.apply(theta["decoder"], jnp.concatenate([*parts, x_q], -1))

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            phi = param_tree("latent", latent_init)
            theta = param_tree("theta", decoder_init)
            z = sample_z(*latent(phi, batch.x_support, batch.y_support), kl_weight(p, batch.x_query.shape[1]))
            observe(lik, decode(theta, z, batch), batch.y_query)

        def guide(batch: TaskBatch, inner_steps: int | None = None) -> None:
            phi = param_tree("latent", latent_init)
            x = jnp.concatenate([batch.x_support, batch.x_query], 1)
            y = jnp.concatenate([batch.y_support, batch.y_query], 1)
            sample_z(*latent(phi, x, y), kl_weight(p, batch.x_query.shape[1]))

        return Method(
            "np", model, guide, elbo="meanfield", predict_with_guide=False, likelihood=lik, inner_loop=False
        )
