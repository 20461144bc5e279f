"""Task-gated initialisations: HSML (Yao et al., ICML 2019) and ARML (Yao et al., ICLR 2020), as
empirical Bayes with MAML's inner loop from a task-specific initialisation.

    theta, representation nets, gate (W_g, b_g)     meta-parameters (numpyro.param)
    z_i = r(D_i^tr)                                  a task representation of the support set
    theta_0i = sigmoid(W_g z_i + b_g) o theta        the gated initialisation (HSML eq. 6; ARML eq. 10,
                                                     survey 002 line 1153: theta_0i = sigma(W_g (t_i
                                                     (+) q_i) + b_g) o theta_0)
    phi_i = GD_s(theta_0i; D_i^tr)                   MAML's inner loop (bayesmeta.adapt.InnerLoop)
    y*_i ~ p(y | f(x*_i; phi_i))                     observed in training, sampled for prediction
    loss = -ELBO + xi * mean_i L_rec,i               the representation's autoencoder reconstruction loss,
                                                     a training-time numpyro.factor (ARML: mu_1 L_t + mu_2
                                                     L_q, survey 002 line 1163; one weight xi = mu_1 =
                                                     mu_2, 0.01 in both references' regression scripts,
                                                     where it is added to the MSE: here it is added to
                                                     the Gaussian NLL, MSE / (2 sd^2), 5.6 x the MSE at
                                                     sd 0.3, so xi = 0.056 weighs it as they do)

The gate is a sigmoid of an affine map of z_i with one output per entry of theta (`gate = "entry"`, as
both references: one dense layer per parameter tensor whose output has the tensor's shape), or one per
tensor (`gate = "tensor"`, cheaper). In the Bayesian reading theta_0i is a task-conditioned prior mean,
shrunk entry by entry towards zero. With W_g = 0 and a large b_g the gate is exactly 1 in float32 and the
model is MAML (tests/test_task_gated.py).

HSML's representation (`hsml`): the support pairs p_j = x_j (+) y_j go through a pooling autoencoder,
g_i = mean_j enc(p_j), L_rec = mean_j ||p_j - dec(enc(p_j))||^2 / dim (HSML eq. 1-2); then a soft
hierarchical clustering (eq. 3-4): level 0 is the one node g_i; level l + 1 has K_{l+1} learned centres,
every node j of level l is assigned to them by p_{j->k} = softmax_k(-||h_j - c_k||^2 / (2 sigma^2)), and
h^{l+1}_k = sum_j p_{j->k} tanh(W_k h^l_j + b_k); a root sums tanh(W_r h^L_k + b_r) over the last level.
z_i = g_i (+) h_i^root (eq. 5). Where we differ from the paper and its code (huaxiuyao/HSML):
  - the code's default (and regression script) aggregator is a GRU autoencoder over a linear embedding
    of the pairs, whose representation depends on the order of the support set; by default we use the
    pooling aggregator (the paper's eq. 1, and the code's `task_embedding_type = mean`), which does not,
    and drop that code path's extra dense layer after the pooling; `aggregator = "gru"` follows the code
    (gru_autoencoder: the mean of the encoder's states, the sequence reconstructed in reverse);
  - the code assigns level 1 -> 2 by a learned linear score (tree_type 1); we use the Gaussian kernel
    to learned centres at every level, as the paper's eq. 3 (the code's tree_type 2 is similar); the
    transform W_k, b_k belongs to the receiving cluster k, as in the code;
  - the reconstruction loss is the mean over points and coordinates (the code's pooling path: 0.5 x that
    mean, its default GRU path: that mean; the paper: a sum); the code's pooling path clips
    meta-gradients to [-3, 3] (its GRU path, which the regression scripts run, does not; here:
    train.grad_clip, a global norm, off by default);
  - the net is Glorot-initialised as everywhere in bayesmeta (the code: truncated normal, sd 0.01), and
    the representation's networks Glorot-normal, untruncated (materialize: one random draw).

ARML's representation (`arml`, the 2-D regression construction of huaxiuyao/ARML): e_j = W_e p_j + b_e;
K prototypes c_k = sum_j P_jk e_j with P = softmax_k(W_p e_j + b_p) (survey 002 line 1082: P_i =
Softmax(W_p E^T(X) + b_p), c^k = P_i[k] F(X)); the prototype graph A_R(c_j, c_m) = sigmoid(W_r |c_j - c_m|
+ b_r) (line 1086); the meta-knowledge graph of G learned vertices h^m with A_G(h^j, h^m) = sigmoid(W_o
|h^j - h^m| + b_o) (line 1106); the super-graph A = (A_R, A_S; A_S^T, A_G) (line 1116) joins them by
A_S(c_j, h^m) = softmax_m(-||c_j - h^m||^2 / (2 sigma^2)) (line 1122, sigma = gamma_s); a GCN propagates
(MP, line 1131), H^(l+1) = tanh(D^-1 (A + I) H^(l) W^(l) + b^(l)), and C_hat is the prototype rows; q_i =
mean_k AG^q(c_k), t_i = mean_k AG^t(c_hat_k) (lines 1143-1147, which write the mean over K prototypes as
1/N^tr), with autoencoder losses L_q, L_t; z_i = t_i (+) q_i; the algorithm is survey lines 1170-1184.
Where we differ from the paper and its code (huaxiuyao/ARML):
  - the code's q_i is a GRU autoencoder over the per-point embeddings e_j (order-dependent) and its t_i a
    GRU over the prototypes (`aggregator = "gru"`, with `q_from = "points"`); by default we use pooling
    autoencoders, q_i over the prototypes as the paper's eq. 8
    (`q_from = "prototypes"`, the default) or over the e_j as the code (`"points"`): with K = 2 the
    prototypes are two weighted means of the linear e_j, so q_i then sees the support set only through
    them, while HSML's pooled representation passes every point through a ReLU net;
  - the paper's scale factors gamma_r, gamma_o are folded into W_r, W_o (the code has none); the graph
    edges have zero self-weight as in the code, and D^-1 (A + I) is the code's row normalisation;
  - the GCN weights are Glorot-initialised (the code: truncated normal, sd 1); AG^q and AG^t are the
    pooling autoencoder above (hidden width `ae_hidden`);
  - not a difference but a property of the reference's single GCN layer (`gnn_layers = 1`): the
    prototype rows of H^(1) read A_R and A_S only, so the vertex-vertex edges A_G never reach C_hat (the
    vertices do, through A_S); `gnn_layers = 2` propagates them.

Both: the gate scales every tensor of theta, also when model.adapt = "head" (the papers gate all of
theta_0). Regression only: for classification the papers embed images with a convolutional network and
(ARML) build class prototypes, which is not implemented here (check() says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers

from bayesmeta.adapt import InnerLoop
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Method, Probe, Requires, Spec, no_guide
from bayesmeta.models.maml import LEARNED_LR, LEARNED_LR_DOC, check_rates, inner_rates
from bayesmeta.nets import dense, make_net
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch

# --------------------------------------------------------------------------------------------- #
# Shared pieces: pair features, pooling autoencoders, the gate.


def pair_features(x: jax.Array, y: jax.Array) -> jax.Array:
    """p_j = x_j (+) y_j, the support pairs of one task: (n, x_dim + y_dim) (HSML's regression input)."""
    return jnp.concatenate([x, y], -1)


@dataclass(frozen=True)
class Init:
    """A parameter's initial value: N(mean, sd^2) entries of `shape` (the constant mean when sd = 0)."""

    shape: tuple[int, ...]
    sd: float = 0.0
    mean: float = 0.0


def materialize(key: jax.Array, spec: Any) -> Any:
    """The tree of arrays a tree of `Init`s describes, from ONE normal draw split among the leaves: each
    random call is compiled on its own, and a dozen small truncated-normal inits took seconds of XLA
    compile time (3.8 s for 15 layers, against 0.2 s for one draw of the same size)."""
    leaves, treedef = jax.tree.flatten(spec)
    sizes = [math.prod(leaf.shape) if leaf.sd > 0 else 0 for leaf in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, at = [], 0
    for leaf, n in zip(leaves, sizes, strict=True):
        out.append(
            leaf.mean + leaf.sd * flat[at : at + n].reshape(leaf.shape)
            if n
            else jnp.full(leaf.shape, leaf.mean, jnp.float32)
        )
        at += n
    return jax.tree.unflatten(treedef, out)


def glorot(*shape: int) -> Init:
    """Glorot-normal (untruncated): sd = sqrt(2 / (fan_in + fan_out)) over the last two axes."""
    return Init(shape, math.sqrt(2.0 / (shape[-2] + shape[-1])))


def dense_spec(n_in: int, n_out: int) -> dict:
    return {"w": glorot(n_in, n_out), "b": Init((n_out,))}


def mlp_spec(sizes: tuple[int, ...]) -> dict:
    """Dense layers layer_0 .. head between the given sizes (Glorot-normal weights, zero biases)."""
    names = [*(f"layer_{i}" for i in range(len(sizes) - 2)), "head"]
    return {n: dense_spec(a, b) for n, a, b in zip(names, sizes[:-1], sizes[1:], strict=True)}


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """ReLU between the layers, linear head."""
    hidden = sorted(k for k in params if k != "head")
    for name in hidden:
        x = jax.nn.relu(dense(params[name], x))
    return dense(params["head"], x)


def autoencoder_spec(n_in: int, mid: int, d: int) -> dict:
    """Encoder n_in -> mid -> d and decoder d -> mid -> n_in (HSML's pooling autoencoder, MeanAutoencoder)."""
    return {"encoder": mlp_spec((n_in, mid, d)), "decoder": mlp_spec((d, mid, n_in))}


def pooled_autoencoder(ae: dict, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean_j enc(v_j), mean_j ||v_j - dec(enc(v_j))||^2 / dim) for a set v (n, dim): the pooling
    aggregator and its reconstruction loss (HSML eq. 1-2; ARML eq. 8-9); enc ends in a ReLU."""
    h = jax.nn.relu(mlp(ae["encoder"], v))
    return jnp.mean(h, 0), jnp.mean(jnp.square(v - mlp(ae["decoder"], h)))


def gru_spec(n_in: int, h: int) -> dict:
    """A GRU cell's weights as TF1's GRUCell initialises them: Glorot gates and candidate (drawn
    normal here, uniform there: the same variance), gate biases 1, candidate bias 0."""
    return {
        "gates": {"w": glorot(n_in + h, 2 * h), "b": Init((2 * h,), mean=1.0)},
        "candidate": {"w": glorot(n_in + h, h), "b": Init((h,))},
    }


def gru_cell(p: dict, x: jax.Array, h: jax.Array) -> jax.Array:
    """h' = u h + (1 - u) tanh([x, r h] W_c + b_c), [r, u] = sigmoid([x, h] W_g + b_g): TF1's GRUCell
    (r first in the split), the cell of the references' autoencoders."""
    r, u = jnp.split(jax.nn.sigmoid(dense(p["gates"], jnp.concatenate([x, h], -1))), 2, -1)
    c = jnp.tanh(dense(p["candidate"], jnp.concatenate([x, r * h], -1)))
    return u * h + (1.0 - u) * c


def gru_autoencoder_spec(n_in: int, h: int) -> dict:
    """Encoder and decoder GRUs (width h) and the decoder's output layer h -> n_in (the references' W
    is truncated normal with sd 1, about 0.88 after the cut, drawn untruncated here; its bias 0.1)."""
    return {
        "encoder": gru_spec(n_in, h),
        "decoder": gru_spec(n_in, h),
        "out": {"w": Init((h, n_in), 0.88), "b": Init((n_in,), mean=0.1)},
    }


def gru_autoencoder(ae: dict, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean_t h_t, mean ||v_t - v_hat_{n+1-t}||^2 / dim) for a sequence v (n, dim) in the given order:
    the references' recurrent aggregator (huaxiuyao/HSML and ARML task_embedding.LSTMAutoencoder, two
    GRUs despite its name). The encoder runs from zeros; the decoder starts from its last state and
    input zeros and feeds each reconstruction back in, reconstructing the sequence in reverse."""

    def encode(h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = gru_cell(ae["encoder"], x, h)
        return h, h

    h_last, hs = jax.lax.scan(encode, jnp.zeros(ae["encoder"]["candidate"]["b"].shape, v.dtype), v)

    def decode(carry: tuple, _: None) -> tuple[tuple, jax.Array]:
        h, x = carry
        h = gru_cell(ae["decoder"], x, h)
        x_hat = dense(ae["out"], h)
        return (h, x_hat), x_hat

    _, v_hat = jax.lax.scan(decode, (h_last, jnp.zeros_like(v[0])), None, length=v.shape[0])
    return jnp.mean(hs, 0), jnp.mean(jnp.square(v - v_hat[::-1]))


AGGREGATORS = {"mean": pooled_autoencoder, "gru": gru_autoencoder}


def gate_spec(z_dim: int, theta_shapes: dict, kind: str) -> dict:
    """The gate's affine map from z: one dense layer per tensor of theta with an output per entry
    ("entry", the references; the tree of theta with a {w, b} layer at each leaf), or one dense layer
    z -> L with one output per tensor ("tensor")."""
    leaves, treedef = jax.tree.flatten(theta_shapes)
    if kind == "tensor":
        return dense_spec(z_dim, len(leaves))
    return jax.tree.unflatten(treedef, [dense_spec(z_dim, max(1, math.prod(leaf.shape))) for leaf in leaves])


def gate_theta(gate: dict, z: jax.Array, theta: dict, kind: str) -> dict:
    """theta_0i = sigmoid(W_g z_i + b_g) o theta for one task (HSML eq. 6, ARML eq. 10)."""
    if kind == "tensor":
        leaves, treedef = jax.tree.flatten(theta)
        g = jax.nn.sigmoid(dense(gate, z))
        return jax.tree.unflatten(treedef, [gi * t for gi, t in zip(g, leaves, strict=True)])
    # theta's structure is a prefix of the gate's: each leaf of theta meets its {w, b} layer
    return jax.tree.map(lambda t, a: jax.nn.sigmoid(dense(a, z)).reshape(t.shape) * t, theta, gate)


def soft_assign(h: jax.Array, centres: jax.Array, var: float) -> jax.Array:
    """p_{j->k} = softmax_k(-||h_j - c_k||^2 / (2 sigma^2)) for nodes h (J, d), centres (K, d): (J, K),
    rows summing to one (HSML eq. 3; ARML's A_S, survey 002 line 1122: gamma_s = sigma)."""
    sq = jnp.sum(jnp.square(h[:, None, :] - centres[None, :, :]), -1)
    return jax.nn.softmax(-sq / (2.0 * var), axis=-1)


def centres(k: int, d: int) -> Init:
    """K centres (or vertices) with sd sqrt(2 / (1 + d)): the variance of the references' Glorot-uniform
    init of a (1, d) variable, drawn normal."""
    return Init((k, d), math.sqrt(2.0 / (1 + d)))


# --------------------------------------------------------------------------------------------- #
# HSML: soft hierarchical clustering of the task representation.


def level_name(i: int) -> str:
    return f"level_{i:02d}"


def cluster_tree_spec(clusters: tuple[int, ...], d: int) -> dict:
    """Per level l: centres (K_l, d), W (K_l, d, d), b (K_l, d); a root W_r (d, d), b_r (d,)."""
    tree = {
        level_name(i): {"centres": centres(k, d), "w": glorot(k, d, d), "b": Init((k, d))}
        for i, k in enumerate(clusters)
    }
    return {**tree, "root": dense_spec(d, d)}


def cluster_level(level: dict, h: jax.Array, var: float) -> tuple[jax.Array, jax.Array]:
    """One level up: h'_k = sum_j p_{j->k} tanh(W_k h_j + b_k) (HSML eq. 4); returns (h' (K, d), p (J, K))."""
    p = soft_assign(h, level["centres"], var)
    u = jnp.tanh(jnp.einsum("jd,kde->jke", h, level["w"]) + level["b"][None])
    return jnp.einsum("jk,jke->ke", p, u), p


def hierarchical_cluster(tree: dict, g: jax.Array, var: float) -> tuple[jax.Array, list[jax.Array]]:
    """The root representation h_i (d,) of one task representation g (d,) and each level's assignments
    [(1, K_1), (K_1, K_2), ...] (HSML eq. 3-4; the root as in huaxiuyao/HSML: sum_k tanh(W_r h_k + b_r))."""
    h, assigns = g[None], []
    for i in range(sum(1 for k in tree if k.startswith("level_"))):
        h, p = cluster_level(tree[level_name(i)], h, var)
        assigns.append(p)
    return jnp.sum(jnp.tanh(dense(tree["root"], h)), 0), assigns


# --------------------------------------------------------------------------------------------- #
# ARML: prototype graph, meta-knowledge graph, super-graph, GCN.


def prototypes(embed: dict, assign: dict, pairs: jax.Array) -> jax.Array:
    """c_k = sum_j P_jk e_j, e_j = W_e p_j + b_e, P = softmax_k(W_p e_j + b_p): (K, d) (ARML's regression
    prototypes, survey 002 line 1082); invariant to the order of the support set."""
    e = dense(embed, pairs)
    return jax.nn.softmax(dense(assign, e), -1).T @ e


def relation_graph(rel: dict, nodes: jax.Array) -> jax.Array:
    """A(n_j, n_m) = sigmoid(w . |n_j - n_m| + b) for j != m, 0 on the diagonal (ARML eq. 4 and 5)."""
    a = jax.nn.sigmoid(jnp.abs(nodes[:, None] - nodes[None]) @ rel["w"][:, 0] + rel["b"][0])
    return a * (1.0 - jnp.eye(nodes.shape[0], dtype=a.dtype))


def super_graph(
    c: jax.Array, a_r: jax.Array, vertices: jax.Array, a_g: jax.Array, var: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, H, A_S): A = [[A_R, A_S], [A_S^T, A_G]], H = [C; H_G] (survey 002 line 1116)."""
    a_s = soft_assign(c, vertices, var)
    a = jnp.concatenate([jnp.concatenate([a_r, a_s], 1), jnp.concatenate([a_s.T, a_g], 1)], 0)
    return a, jnp.concatenate([c, vertices], 0), a_s


def gcn(layers: list[dict], a: jax.Array, h: jax.Array) -> jax.Array:
    """H^(l+1) = tanh(D^-1 (A + I) H^(l) W^(l) + b^(l)), D the row sums of A + I (huaxiuyao/ARML's
    GraphConvolution; MP in survey 002 line 1131)."""
    a = a + jnp.eye(a.shape[0], dtype=a.dtype)
    a = a / jnp.sum(a, 1, keepdims=True)
    for layer in layers:
        h = jnp.tanh(a @ dense(layer, h))
    return h


def gcn_names(n: int) -> list[str]:
    return [f"layer_{i:02d}" for i in range(n)]


def arml_representation(
    nets: dict,
    x: jax.Array,
    y: jax.Array,
    k: int,
    var: float,
    gnn_layers: int,
    q_from: str,
    aggregator: str = "mean",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z_i = t_i (+) q_i, L_q + L_t, A_S) of one task's support set (x, y): t_i aggregates the GCN's
    prototype rows C_hat (ARML eq. 9); q_i the prototypes C (`q_from = "prototypes"`, the paper's eq. 8)
    or the support points' embeddings e_j (`"points"`, huaxiuyao/ARML's regression code); by pooling
    or, as the code, a GRU autoencoder (`aggregator`)."""
    pairs = pair_features(x, y)
    c = prototypes(nets["embed"], nets["assign"], pairs)
    a_g = relation_graph(nets["vertex_rel"], nets["vertices"])
    a, h, a_s = super_graph(c, relation_graph(nets["proto_rel"], c), nets["vertices"], a_g, var)
    c_hat = gcn([nets["gcn"][n] for n in gcn_names(gnn_layers)], a, h)[:k]
    aggregate = AGGREGATORS[aggregator]
    q, loss_q = aggregate(nets["ae_q"], c if q_from == "prototypes" else dense(nets["embed"], pairs))
    t, loss_t = aggregate(nets["ae_t"], c_hat)
    return jnp.concatenate([t, q]), loss_q + loss_t, a_s


def arml_spec(
    n_in: int, d: int, k: int, vertices: int, ae_hidden: int, gnn_layers: int, aggregator: str = "mean"
) -> dict:
    """ARML's networks: pair embedding, prototype assignment, the two relation maps, the vertices, the
    autoencoders AG^q and AG^t (pooling, or GRUs of width d as the references), and the GCN layers."""
    ae = autoencoder_spec(d, ae_hidden, d) if aggregator == "mean" else gru_autoencoder_spec(d, d)
    return {
        "embed": dense_spec(n_in, d),
        "assign": dense_spec(d, k),
        "proto_rel": dense_spec(d, 1),
        "vertex_rel": dense_spec(d, 1),
        "vertices": centres(vertices, d),
        "ae_q": ae,
        "ae_t": ae,
        "gcn": {n: dense_spec(d, d) for n in gcn_names(gnn_layers)},
    }


# --------------------------------------------------------------------------------------------- #
# The model: gated initialisation, then MAML's inner loop.

Represent = Any  # (x_support (T, n, xd), y_support (T, n, yd)) -> (z (T, z_dim), reconstruction (T,))


def build_gated(
    cfg: ModelConfig, p: Any, x_dim: int, y_dim: int, name: str, z_dim: int, represent: Represent
) -> Method:
    """The shared model of HSML and ARML: theta gated by the task representation, then MAML."""
    lik = make_likelihood(cfg)
    net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
    inner = InnerLoop.from_config(cfg)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0))

    def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return lik.loss(net.apply(params, x), y)

    def adapt(
        theta: dict, x: jax.Array, y: jax.Array, inner_steps: int | None = None, training: bool = False
    ) -> dict:
        """phi_i = GD(gate(z_i) o theta; D_i) for every task (numpyro.param sites: nets, gate, rates)."""
        z, recon = represent(x, y)
        if training and p.recon_weight > 0:
            numpyro.factor(f"{name}_reconstruction", -p.recon_weight * jnp.mean(recon))
        gate = param_tree(f"{name}.gate", lambda key: materialize(key, gate_spec(z_dim, shapes, p.gate)))
        init = jax.vmap(lambda zi: gate_theta(gate, zi, theta, p.gate))(z)
        lr = inner_rates(cfg, p.learned_lr, p.lr_init, theta)
        return inner(task_loss, init, x, y, inner_steps, per_task=True, lr=lr)[0]

    def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
        theta = param_tree("theta", net.init)
        phi = adapt(theta, batch.x_support, batch.y_support, inner_steps, training)
        observe(lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

    def probe(params: dict) -> Probe:
        """theta is the shared initialisation; adaptation includes the task's gate."""
        fitted = handlers.substitute(adapt, data=params)
        theta = tree_from_params("theta", net.init, params)
        return Probe(theta, fitted, task_loss, task_loss, net.features)

    return Method(name=name, model=model, guide=no_guide, probe=probe, likelihood=lik)


@dataclass(frozen=True)
class GatedParams:
    """Options shared by HSML and ARML."""

    hidden: int = opt(40, ge=1, doc="d, width of the task representation (hidden_dim 40 in both references)")
    ae_hidden: int = opt(20, ge=1, doc="hidden width of the pooling autoencoders (20 in huaxiuyao/HSML)")
    cluster_var: float = opt(
        2.0,
        gt=0,
        doc="sigma^2 of the soft assignments exp(-||h - c||^2 / (2 sigma^2)) (2 in both references)",
    )
    recon_weight: float = opt(
        0.01,
        ge=0,
        doc="xi, weight of the autoencoders' reconstruction loss beside the NLL (emb_loss_weight 0.01 "
        "beside the MSE in the references: 0.056 weighs it as they do at noise sd 0.3); 0 = off",
    )
    gate: str = opt(
        "entry",
        choices=["entry", "tensor"],
        doc="one sigmoid gate per entry of theta (the references) or one per parameter tensor",
    )
    learned_lr: str = opt("none", choices=LEARNED_LR, doc=LEARNED_LR_DOC)
    lr_init: float | None = opt(None, gt=0, doc="initial learned inner rate; default model.inner_lr")
    aggregator: str = opt(
        "mean",
        choices=list(AGGREGATORS),
        doc="the task representation's autoencoders: pooling (the papers' eq., order-free) or GRUs over the "
        "support set in its given order (the references' regression code; HSML's after a linear "
        "embedding of width ae_hidden)",
    )


def check_gated(cfg: ModelConfig, p: GatedParams) -> str | None:
    return check_rates(cfg, p.learned_lr)


@dataclass(frozen=True)
class HSML(Spec):
    """HSML: a pooling autoencoder's task representation, softly clustered level by level, gates theta."""

    requires: ClassVar[Requires] = {"likelihood": ("gaussian",)}  # implemented for regression only

    @dataclass(frozen=True)
    class Params(GatedParams):
        clusters: tuple[int, ...] = opt(
            (4, 2),
            ge=1,
            doc="clusters per level, bottom up, below a root (cluster_layer_0 = 4, cluster_layer_1 = 2 in "
            "huaxiuyao/HSML)",
        )

    @staticmethod
    def check(cfg: ModelConfig, p: Params) -> str | None:
        if not p.clusters:
            return "model.params.clusters: expected at least one level, got []"
        return check_gated(cfg, p)

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: object = None) -> Method:
        d = p.hidden

        n_in = x_dim + y_dim
        if p.aggregator == "mean":
            ae_spec = autoencoder_spec(n_in, p.ae_hidden, d)
        else:  # huaxiuyao/HSML: a linear embedding of the pairs (width 20), then the GRUs
            ae_spec = {"embed": dense_spec(n_in, p.ae_hidden), "gru": gru_autoencoder_spec(p.ae_hidden, d)}

        def aggregate(ae: dict, pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
            if p.aggregator == "mean":
                return pooled_autoencoder(ae, pairs)
            return gru_autoencoder(ae["gru"], dense(ae["embed"], pairs))

        def represent(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
            ae = param_tree("hsml.autoencoder", lambda k: materialize(k, ae_spec))
            tree = param_tree(
                "hsml.clusters", lambda k: materialize(k, cluster_tree_spec(tuple(p.clusters), d))
            )

            def one(xi: jax.Array, yi: jax.Array) -> tuple:
                g, recon = aggregate(ae, pair_features(xi, yi))
                root, assigns = hierarchical_cluster(tree, g, p.cluster_var)
                return jnp.concatenate([g, root]), recon, assigns[0][0]

            z, recon, assign = jax.vmap(one)(x, y)
            numpyro.deterministic("cluster_assign", assign)  # (T, K_1): the first level's soft clusters
            return z, recon

        return build_gated(cfg, p, x_dim, y_dim, "hsml", 2 * d, represent)


@dataclass(frozen=True)
class ARML(Spec):
    """ARML: the support's prototype graph joined to a meta-knowledge graph; a GCN's output gates theta."""

    requires: ClassVar[Requires] = {"likelihood": ("gaussian",)}  # implemented for regression only

    @dataclass(frozen=True)
    class Params(GatedParams):
        vertices: int = opt(
            6, ge=1, doc="G, vertices of the meta-knowledge graph (num_vertex 6 for 2-D regression)"
        )
        prototypes: int = opt(
            2, ge=1, doc="K, prototypes of the support set (num_classes 2 for 2-D regression)"
        )
        gnn_layers: int = opt(
            1, ge=1, doc="graph convolution layers on the super-graph (1 in huaxiuyao/ARML)"
        )
        q_from: str = opt(
            "prototypes",
            choices=["prototypes", "points"],
            doc="what q_i pools: the prototypes (the paper's eq. 8) or the support points' embeddings e_j "
            "(huaxiuyao/ARML's regression code, there through a GRU)",
        )

    @staticmethod
    def check(cfg: ModelConfig, p: Params) -> str | None:
        return check_gated(cfg, p)

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: object = None) -> Method:
        d, k = p.hidden, p.prototypes

        spec = arml_spec(x_dim + y_dim, d, k, p.vertices, p.ae_hidden, p.gnn_layers, p.aggregator)

        def represent(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
            nets = param_tree("arml", lambda key: materialize(key, spec))

            def one(xi: jax.Array, yi: jax.Array) -> tuple:
                return arml_representation(
                    nets, xi, yi, k, p.cluster_var, p.gnn_layers, p.q_from, p.aggregator
                )

            z, recon, a_s = jax.vmap(one)(x, y)
            numpyro.deterministic("vertex_assign", a_s)  # (T, K, G): each prototype's weights on the vertices
            return z, recon

        return build_gated(cfg, p, x_dim, y_dim, "arml", 2 * d, represent)
