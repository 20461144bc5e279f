"""Memory-augmented neural networks, MANN (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap 2016;
METHODS 9) as a NumPyro model. Survey 002, lines 577-660:

    the episode as a sequence (x_1, null), (x_2, y_1), ..., (x_T, y_{T-1})      labels offset by one step
    h_t, c_t = LSTM([x_t, onehot(y_{t-1}), r_{t-1}], h_{t-1}, c_{t-1})          the controller
    per read head: key k_t = tanh(W_k h_t + b_k), gate alpha_t = W_a h_t + b_a
    w^w_t = sigmoid(alpha_t) w^r_{t-1} + (1 - sigmoid(alpha_t)) w^lu_{t-1}       least-recently-used write
    M_t(i) = M_{t-1}(i) [i not the least used slot of w^u_{t-1}] + sum_heads w^w_t(i) k_t
    w^r_t(i) = softmax_i(K(k_t, M_t(i))),  K the cosine similarity;  r_t = sum_i w^r_t(i) M_t(i)
    w^u_t = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t)                          usage weights
    w^lu_t(i) = 1 if w^u_t(i) <= m(w^u_t, n) else 0,  m(v, n) the n-th smallest, n the number of reads
    p(y_t | x_t, D_{1:t-1}) = softmax(W_o [h_t, r_t] + b_o)

The paper zeroes the least used slot before writing (its section 3.2), and its defaults are 200 LSTM
units, 128 slots of width 40 and 4 read heads with gamma = 0.95 (`units`, `slots`, `width`, `heads`,
`gamma`). x_t is the configured net's features (an MLP with no hidden layer is the paper's raw pixels;
conv4 with max pooling a convolutional encoder, batch norm over each set as ProtoNet's).

Two options depart from the paper's equations, for the plateau at the uniform prediction that the
paper's read attention gives at these sizes: a softmax over cosines in [-1, 1] across 128 slots, most
of them empty (their cosine counts whatever their norm), puts at most e^2 / 128 of the weight on the
right slot, so the read carries little of the bound label until the output weights grow about a
hundredfold. `key_strength` multiplies each head's cosines by beta_t = 1 + softplus(W_b h_t + b_b)
(the neural Turing machine's key strength, Graves et al. 2014) with beta_0 = `strength` at
initialisation; `add_vector` writes a_t = tanh(W_v h_t + b_v) instead of the key (as NTM's add vector),
so that what is stored (the previous item's features with the label that arrived after them) need not
be what the next read looks for.

The engine's episode (support and query sets) becomes the sequence: the support items in a random order
per task (numpyro.prng_key; the sampler lays them out class by class, which would give the next label
away), each presented with the previous item's label, then every query item as the next step, with the
last support label and its own label unseen; the queries are predicted independently from the state
after the support sequence (no query label is ever an input, so prediction needs only the support
labels, as for every other method). The likelihood is over the query labels; `step_loss` adds the
paper's loss at every support step (p(y_t | x_t, D_{1:t-1}) for the support items, site "steps",
training only), weighted as the queries.

Accuracy by instance (the paper's Table 2): `episode_metrics` runs the whole labelled episode (support
and query items, shuffled) as one sequence with every label revealed a step later, and reports the
accuracy at the n-th presentation of a class, n in 1, 2, 3, 4, 5, 10 (those that the episode's
shots + queries per class allow). No inner loop: `inner_steps` is accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import scale

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, no_guide
from bayesmeta.models.baselines import Classifier
from bayesmeta.nets import dense, dense_init, embedding, lstm_cell, lstm_init, make_net, task_vmap
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch

EPS = 1e-8
INSTANCES = (1, 2, 3, 4, 5, 10)


class Memory(NamedTuple):
    """The external memory's state: M (slots, width), w^r (heads, slots), w^u and w^lu (slots,)."""

    m: jax.Array
    read: jax.Array
    usage: jax.Array
    least: jax.Array


def least_used(usage: jax.Array, n: int) -> jax.Array:
    """w^lu(i) = 1 if w^u(i) <= m(w^u, n) else 0, m(v, n) the n-th smallest entry of v (Santoro et al.
    section 3.2)."""
    return (usage <= jnp.sort(usage)[n - 1]).astype(usage.dtype)


def write_weights(alpha: jax.Array, read_prev: jax.Array, least_prev: jax.Array) -> jax.Array:
    """w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}, per head: alpha (heads,),
    w^r (heads, slots), w^lu (slots,)."""
    g = jax.nn.sigmoid(alpha)[:, None]
    return g * read_prev + (1 - g) * least_prev[None]


def update_usage(usage: jax.Array, read: jax.Array, write: jax.Array, gamma: float) -> jax.Array:
    """w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t, summed over the heads."""
    return gamma * usage + jnp.sum(read, 0) + jnp.sum(write, 0)


def cosine_read(keys: jax.Array, m: jax.Array, strength: jax.Array | float = 1.0) -> jax.Array:
    """w^r(i) = softmax_i(beta k . M(i) / (|k| |M(i)|)) for keys (heads, width) and key strengths beta
    (heads,) or a scalar (the paper: beta = 1): (heads, slots)."""
    unit = lambda v: v * jax.lax.rsqrt(jnp.sum(jnp.square(v), -1, keepdims=True) + EPS)  # noqa: E731
    return jax.nn.softmax(jnp.reshape(strength, (-1, 1)) * (unit(keys) @ unit(m).T), axis=-1)


def memory_step(
    mem: Memory,
    keys: jax.Array,
    alpha: jax.Array,
    gamma: float,
    strength: jax.Array | float = 1.0,
    values: jax.Array | None = None,
) -> tuple[Memory, jax.Array]:
    """One LRU access (module docstring): write the values (heads, width; the keys when None) by w^w
    into M with the least used slot of w^u_{t-1} cleared, read M_t back by cosine attention of the
    keys sharpened by the key strengths: (new memory, reads (heads, width))."""
    heads = keys.shape[0]
    write = write_weights(alpha, mem.read, mem.least)
    cleared = mem.m * (1 - jax.nn.one_hot(jnp.argmin(mem.usage), mem.m.shape[0]))[:, None]
    m = cleared + write.T @ (keys if values is None else values)
    read = cosine_read(keys, m, strength)
    usage = update_usage(mem.usage, read, write, gamma)
    return Memory(m, read, usage, least_used(usage, heads)), read @ m


@dataclass(frozen=True)
class Sizes:
    units: int
    slots: int
    width: int
    heads: int
    ways: int
    key_strength: bool = False
    strength: float = 10.0
    add_vector: bool = False


def strength_init(key: jax.Array, s: Sizes) -> dict:
    """The key-strength head beta_t = 1 + softplus(W h_t + b), b such that beta = s.strength at W h = 0."""
    p = dense_init(key, s.units, s.heads)
    return p | {"b": jnp.full((s.heads,), jnp.log(jnp.expm1(s.strength - 1.0)))}


def mann_init(key: jax.Array, d: int, s: Sizes) -> dict:
    """Controller LSTM (input [x, onehot(y_prev), r_prev]), key and gate heads, output layer."""
    kc, kk, ka, ko = jax.random.split(key, 4)
    n_in = d + s.ways + s.heads * s.width
    p = {
        "lstm": lstm_init(kc, n_in, s.units, s.units),
        "key": dense_init(kk, s.units, s.heads * s.width),
        "alpha": dense_init(ka, s.units, s.heads),
        "out": dense_init(ko, s.units + s.heads * s.width, s.ways),
    }
    kb, kv = jax.random.split(jax.random.fold_in(key, 4))  # the paper's parameters keep their keys
    return (
        p
        | ({"strength": strength_init(kb, s)} if s.key_strength else {})
        | ({"value": dense_init(kv, s.units, s.heads * s.width)} if s.add_vector else {})
    )


def initial_state(s: Sizes) -> tuple:
    """(h, c, r, memory) before the first step: zeros, a small constant memory (cosine needs |M(i)| > 0),
    uniform reads."""
    z = jnp.zeros((s.units,))
    mem = Memory(
        jnp.full((s.slots, s.width), 1e-6),
        jnp.full((s.heads, s.slots), 1.0 / s.slots),
        jnp.zeros((s.slots,)),
        least_used(jnp.zeros((s.slots,)), s.heads),
    )
    return z, z, jnp.zeros((s.heads * s.width,)), mem


def step(p: dict, s: Sizes, gamma: float, state: tuple, x: jax.Array, y_prev: jax.Array) -> tuple:
    """One time step on input features x (d,) and the previous label's one-hot (or zeros): (state, logits)."""
    h, c, r, mem = state
    h, c = lstm_cell(p["lstm"], jnp.concatenate([x, y_prev, r]), h, c)
    keys = jnp.tanh(dense(p["key"], h)).reshape(s.heads, s.width)
    strength = 1 + jax.nn.softplus(dense(p["strength"], h)) if s.key_strength else 1.0
    values = jnp.tanh(dense(p["value"], h)).reshape(s.heads, s.width) if s.add_vector else None
    mem, reads = memory_step(mem, keys, dense(p["alpha"], h), gamma, strength, values)
    r = reads.reshape(-1)
    return (h, c, r, mem), dense(p["out"], jnp.concatenate([h, r]))


def run_sequence(p: dict, s: Sizes, gamma: float, x: jax.Array, y: jax.Array) -> tuple[tuple, jax.Array]:
    """The sequence (x_t, onehot(y_{t-1})) for features x (T, d) and labels y (T,): (final state, logits
    at every step (T, ways))."""
    prev = jnp.concatenate([jnp.zeros((1, s.ways)), jax.nn.one_hot(y[:-1], s.ways)])

    def body(state: tuple, inp: tuple) -> tuple:
        return step(p, s, gamma, state, *inp)

    return jax.lax.scan(body, initial_state(s), (x, prev))


def few_shot_logits(p: dict, s: Sizes, gamma: float, z_s, y_s, z_q) -> tuple[jax.Array, jax.Array]:
    """One task, support already in sequence order: logits at the support steps (n_s, ways) and of each
    query as the step after the support sequence (n_q, ways)."""
    state, support_logits = run_sequence(p, s, gamma, z_s, y_s)
    last = jax.nn.one_hot(y_s[-1], s.ways)
    queries = jax.vmap(lambda zq: step(p, s, gamma, state, zq, last)[1])(z_q)
    return support_logits, queries


def instance_numbers(y: jax.Array, ways: int) -> jax.Array:
    """n_t = 1 + the number of earlier items of y_t's class in the sequence y (T,): the presentation."""
    onehot = jax.nn.one_hot(y, ways)
    return jnp.sum((jnp.cumsum(onehot, 0) * onehot), -1).astype(jnp.int32)


def instance_accuracy(logits: jax.Array, y: jax.Array, ways: int, instances: tuple[int, ...]) -> dict:
    """Accuracy at the n-th presentation of a class, for each n: the mean over the steps of one sequence
    (logits (T, ways), labels (T,)) whose instance number is n (NaN when there is none)."""
    n = instance_numbers(y, ways)
    right = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    out = {}
    for k in instances:
        at = n == k
        out[f"accuracy_instance_{k}"] = jnp.sum(right * at) / jnp.where(at.any(), jnp.sum(at), jnp.nan)
    return out


def shuffle(key: jax.Array, n_tasks: int, n: int) -> jax.Array:
    """An independent random order of n items for each of n_tasks tasks: (T, n)."""
    return jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n_tasks))


def take(a: jax.Array, order: jax.Array) -> jax.Array:
    """a (T, n, ...) reordered along its item axis by order (T, n)."""
    return jnp.take_along_axis(a, order.reshape(*order.shape, *[1] * (a.ndim - 2)), 1)


class MANN(Classifier):
    """An LSTM controller with an LRU-access external memory over the episode as a label-offset sequence."""

    @dataclass(frozen=True)
    class Params:
        units: int = opt(200, ge=1, doc="LSTM controller units (the paper: 200)")
        slots: int = opt(128, ge=2, doc="memory slots (the paper: 128)")
        width: int = opt(40, ge=1, doc="memory slot width (the paper: 40)")
        heads: int = opt(4, ge=1, doc="read heads, also the n of the least-used weights (the paper: 4)")
        gamma: float = opt(0.95, ge=0, le=1, doc="usage decay gamma in w^u = gamma w^u + w^r + w^w")
        step_loss: bool = opt(False, doc="also fit the prediction at every support step (the paper's loss)")
        key_strength: bool = opt(
            False,
            doc="sharpen each read head's cosine attention by a key strength beta_t = 1 + softplus(W h_t), "
            "as the neural Turing machine's content addressing (Graves et al. 2014); the paper has none",
        )
        strength: float = opt(10.0, gt=1, doc="with key_strength: beta at initialisation (W h_t = 0)")
        add_vector: bool = opt(
            False, doc="write a separate add vector a_t = tanh(W h_t) instead of the key (the paper: the key)"
        )

    @staticmethod
    def check(cfg: ModelConfig, params: Params) -> str | None:
        if params.heads > params.slots:
            return "model.params.heads: at most model.params.slots"
        return None

    @staticmethod
    def build(cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        p = params
        body, d = embedding(net, x_dim)
        sizes = Sizes(p.units, p.slots, p.width, p.heads, y_dim, p.key_strength, p.strength, p.add_vector)

        def init(key: jax.Array) -> dict:
            kb, km = jax.random.split(key)
            return {"embed": body(kb), "mann": mann_init(km, d, sizes)}

        def embed(theta: dict, x: jax.Array) -> jax.Array:
            return task_vmap(net, net.features, theta["embed"], x)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            key = numpyro.prng_key()
            key = jax.random.PRNGKey(0) if key is None else key
            order = shuffle(key, *batch.y_support.shape[:2])
            y_s = take(batch.y_support, order)
            z_s, z_q = take(embed(theta, batch.x_support), order), embed(theta, batch.x_query)
            support, queries = jax.vmap(
                lambda a, b, c: few_shot_logits(theta["mann"], sizes, p.gamma, a, b, c)
            )(z_s, y_s, z_q)
            if p.step_loss and training and batch.y_query is not None:
                n_tasks, n_s = y_s.shape
                weight = 1.0 / (n_tasks * batch.y_query.shape[1])  # a support step weighs as a query
                with (
                    numpyro.plate("step_tasks", n_tasks, dim=-2),
                    numpyro.plate("support_steps", n_s, dim=-1),
                    scale(scale=weight),
                ):
                    numpyro.sample("steps", dist.Categorical(logits=support), obs=y_s)
            observe(lik, queries, batch.y_query)

        def by_instance(params_: dict, batch: TaskBatch, key: jax.Array) -> dict:
            """Accuracy by instance on the whole labelled episode as one label-offset sequence."""
            theta = tree_from_params("theta", init, params_)
            x = jnp.concatenate([batch.x_support, batch.x_query], 1)
            y = jnp.concatenate([batch.y_support, batch.y_query], 1)
            order = shuffle(key, *y.shape[:2])
            z, y = take(embed(theta, x), order), take(y, order)
            logits = jax.vmap(lambda a, b: run_sequence(theta["mann"], sizes, p.gamma, a, b)[1])(z, y)
            per_class = y.shape[1] // y_dim
            keep = tuple(k for k in INSTANCES if k <= per_class)
            return jax.vmap(lambda lo, yy: instance_accuracy(lo, yy, y_dim, keep))(logits, y)

        return Method(
            name="mann",
            model=model,
            guide=no_guide,
            likelihood=lik,
            episode_metrics=by_instance,
            inner_loop=False,
        )
