"""MUMOMAML, multimodal MAML (Vuorio et al. 2019, METHODS 9): a task encoder reads the support set and
modulates MAML's network (FiLM) before the inner loop, which then adapts the network, as empirical Bayes.

    e_i = encoder({(x_j, y_j)} of D_i)                        task embedding
    gamma_il = 1 + A_l e_i + a_l,   beta_il = B_l e_i + c_l    FiLM scale and shift per hidden unit
    h_l = act((h_{l-1} W_l + b_l) * gamma_il + beta_il)        the modulated network (head unmodulated)
    phi_i = GD_s(theta; D_i) through the modulated network, the modulation held fixed
    y*_i ~ p(y | f(x*_i; phi_i, gamma_i, beta_i))

theta (`theta`), the encoder (`encoder`) and the modulation heads (`film`) are numpyro.param sites; the
inner loop adapts theta only (InnerLoop with `fixed`). The heads start at zero, so the initial model
is MAML (gamma = 1, beta = 0); with zero heads it is MAML at any encoder (tests/test_mumomaml.py).

The encoder, as the reference regression code (github.com/vuoristo/MMAML-Regression,
lstm_embedding_model.py, gated_net.py): a bidirectional LSTM over the support pairs in their order
(`encoder = "lstm"`, `encoder_layers` layers of `encoder_hidden` units, 2 x 40 there), the embedding
being the last forward output beside the first backward one; FiLM after each hidden layer's linear map
and before its activation, gamma = 1 + output. `encoder = "mean"` replaces it by a permutation-invariant
one: an MLP of each (x, y) pair, averaged. Differences: the reference clips the inner gradients at 10
and uses a 100-100-100 network on its 1-D regression; the network here is `model.net`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from bayesmeta.adapt import InnerLoop
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Requires, Spec, no_guide
from bayesmeta.nets import ACTIVATIONS, MLP, dense, dense_init, lstm_cell, make_net
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch

FILM = "film"
"""The key under which the per-task modulation joins the adapted parameters the loss reads."""


def modulated_apply(net: MLP, params: dict, x: jax.Array) -> jax.Array:
    """The MLP with FiLM after each hidden linear map: act((h W + b) * scale + shift); params[FILM] holds
    {layer: {"scale", "shift"}} for one task (absent: unmodulated)."""
    act = ACTIVATIONS[net.activation]
    film = params.get(FILM)
    h = x
    for name in net.layer_names[:-1]:
        h = dense(params[name], h)
        if film is not None:
            h = h * film[name]["scale"] + film[name]["shift"]
        h = act(h)
    return dense(params["head"], h)


def lstm_init(key: jax.Array, n_in: int, n_hidden: int) -> dict:
    """One LSTM direction: gates (i, f, g, o) stacked, weights ~ U(-1/sqrt(h), 1/sqrt(h)) (PyTorch's)."""
    k1, k2, k3 = jax.random.split(key, 3)
    s = 1.0 / jnp.sqrt(n_hidden)
    u = lambda k, shape: jax.random.uniform(k, shape, minval=-s, maxval=s)  # noqa: E731
    return {
        "wx": u(k1, (n_in, 4 * n_hidden)),
        "wh": u(k2, (n_hidden, 4 * n_hidden)),
        "b": u(k3, (4 * n_hidden,)),
    }


def lstm_run(p: dict, xs: jax.Array) -> jax.Array:
    """Outputs h_t (n, hidden) of an LSTM over the sequence xs (n, d), from zero state:
    c_t = sigma(f) c_{t-1} + sigma(i) tanh(g), h_t = sigma(o) tanh(c_t)."""
    n_hidden = p["wh"].shape[0]

    def step(carry: tuple, x: jax.Array) -> tuple:
        h, c = lstm_cell(p, x, *carry)
        return (h, c), h

    zero = jnp.zeros((n_hidden,), xs.dtype)
    return lax.scan(step, (zero, zero), xs)[1]


def bilstm_embed(layers: dict, pairs: jax.Array) -> jax.Array:
    """A stacked bidirectional LSTM over one support set's pairs (n, d): the embedding is the last
    forward output beside the first backward output (2 hidden,) (the reference's)."""
    h = pairs
    for i in range(len(layers)):  # by index: a pytree's dict keys sort as text (layer_10 < layer_2)
        layer = layers[f"layer_{i}"]
        fwd = lstm_run(layer["forward"], h)
        bwd = lstm_run(layer["backward"], h[::-1])[::-1]
        h = jnp.concatenate([fwd, bwd], -1)
    half = h.shape[-1] // 2
    return jnp.concatenate([h[-1, :half], h[0, half:]])


def mean_embed(layers: dict, pairs: jax.Array) -> jax.Array:
    """A permutation-invariant embedding: mean over pairs of an MLP (ReLU) of each pair."""
    h = pairs
    for i in range(len(layers)):
        h = jax.nn.relu(dense(layers[f"layer_{i}"], h))
    return jnp.mean(h, 0)


@dataclass(frozen=True)
class MUMOMAML(Spec):
    """Multimodal MAML: FiLM modulation from a support-set encoder, then MAML's inner loop."""

    @dataclass(frozen=True)
    class Params:
        encoder: str = opt(
            "lstm",
            choices=["lstm", "mean"],
            doc="bidirectional LSTM over the support pairs (the reference), or an MLP averaged over them",
        )
        encoder_hidden: int = opt(
            40, ge=1, doc="units per encoder layer (per direction for the LSTM; 40 in the reference)"
        )
        encoder_layers: int = opt(2, ge=1, doc="encoder layers (2 in the reference)")

    # FiLM on an MLP's hidden layers, from an encoder of (x, y) regression pairs
    requires: ClassVar[Requires] = {"net.kind": ("mlp",), "likelihood": ("gaussian",)}

    @staticmethod
    def build(
        cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context | None = None
    ) -> Method:
        lik = make_likelihood(cfg)
        net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
        inner = InnerLoop.from_config(cfg)
        p = params
        hidden = dict(zip(net.layer_names[:-1], net.hidden, strict=True))
        d_in = x_dim + y_dim

        def encoder_init(key: jax.Array) -> dict:
            """Encoder layers by name (layer_0, ... in order; dicts keep insertion order)."""
            keys = jax.random.split(key, 2 * p.encoder_layers)
            if p.encoder == "mean":
                sizes = [d_in] + [p.encoder_hidden] * p.encoder_layers
                return {
                    f"layer_{i}": dense_init(keys[i], sizes[i], sizes[i + 1]) for i in range(p.encoder_layers)
                }
            sizes = [d_in] + [2 * p.encoder_hidden] * p.encoder_layers
            return {
                f"layer_{i}": {
                    "forward": lstm_init(keys[2 * i], sizes[i], p.encoder_hidden),
                    "backward": lstm_init(keys[2 * i + 1], sizes[i], p.encoder_hidden),
                }
                for i in range(p.encoder_layers)
            }

        embed_dim = p.encoder_hidden * (2 if p.encoder == "lstm" else 1)
        embed = bilstm_embed if p.encoder == "lstm" else mean_embed

        def film_init(_: jax.Array) -> dict:
            zero = lambda w: {"w": jnp.zeros((embed_dim, w)), "b": jnp.zeros((w,))}  # noqa: E731
            return {name: {"scale": zero(w), "shift": zero(w)} for name, w in hidden.items()}

        def modulation(encoder: dict, heads: dict, x: jax.Array, y: jax.Array) -> dict:
            """FiLM parameters {layer: {"scale", "shift"}} (T, width) of each task's support set."""
            e = jax.vmap(lambda pairs: embed(encoder, pairs))(jnp.concatenate([x, y], -1))
            return {
                name: {"scale": 1.0 + dense(h["scale"], e), "shift": dense(h["shift"], e)}
                for name, h in heads.items()
            }

        def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            return lik.loss(modulated_apply(net, params, x), y)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", net.init)
            encoder = param_tree("encoder", encoder_init)
            heads = param_tree(FILM, film_init)
            film = modulation(encoder, heads, batch.x_support, batch.y_support)
            phi, _ = inner(
                task_loss, theta, batch.x_support, batch.y_support, inner_steps, fixed={FILM: film}
            )
            out = jax.vmap(lambda ph, f, x: modulated_apply(net, {**ph, FILM: f}, x))(
                phi, film, batch.x_query
            )
            observe(lik, out, batch.y_query)

        return Method(name="mumomaml", model=model, guide=no_guide, likelihood=lik)
