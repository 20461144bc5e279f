"""Pure-JAX networks: `init(key) -> params` (a dict of layers) and `apply(params, x)` for one task.

Parameters are nested dicts {layer_name: {leaf: array}} whose last layer is always "head", so an inner
loop can adapt "all" layers or the "head" only; the MLP and the conv net share that shape.

Both take an optional FiLM conditioning (Perez et al. 2018) in `features`: per hidden layer (MLP) or conv
block (Conv4) a pair (gamma, beta) of `film_widths` entries, applied as gamma * h + beta to the layer's
pre-activation (after batch norm in a block); None leaves the layer as it is, and gamma = 1, beta = 0 is
the identity. A method that conditions the network on a task (TADAM's task embedding) builds the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from bayesmeta.config import NetConfig

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "elu": jax.nn.elu}


def dense_init(key: jax.Array, n_in: int, n_out: int, sd: float = 0.0) -> dict[str, jax.Array]:
    """Glorot-normal weights (sd = 0) or N(0, sd^2) truncated at 2 sd (TensorFlow's truncated_normal, the
    MAML, HSML and ARML reference code's sd 0.01), zero bias."""
    if sd > 0:
        w = jax.nn.initializers.truncated_normal(sd)(key, (n_in, n_out), jnp.float32)
    else:
        w = jax.nn.initializers.glorot_normal()(key, (n_in, n_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def dense(layer: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ layer["w"] + layer["b"]


Film = tuple[tuple[jax.Array, jax.Array], ...] | None
"""FiLM parameters of a network: one (gamma, beta) pair per modulated layer, or None (no modulation)."""


def film(h: jax.Array, pair: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """Feature-wise linear modulation gamma * h + beta over the last (channel) axis; None is the identity."""
    return h if pair is None else h * pair[0] + pair[1]


def lstm_init(key: jax.Array, n_in: int, n_state: int, n_hidden: int) -> dict[str, jax.Array]:
    """An LSTM cell reading inputs (n_in) and a recurrent state (n_state, usually n_hidden): Glorot-normal
    kernels of the four gates (input, forget, cell, output), zero bias except forget-gate bias 1."""
    kx, kh = jax.random.split(key)
    glorot = jax.nn.initializers.glorot_normal()
    b = jnp.zeros((4 * n_hidden,), jnp.float32).at[n_hidden : 2 * n_hidden].set(1.0)
    return {
        "wx": glorot(kx, (n_in, 4 * n_hidden), jnp.float32),
        "wh": glorot(kh, (n_state, 4 * n_hidden), jnp.float32),
        "b": b,
    }


def lstm_cell(
    p: dict[str, jax.Array], x: jax.Array, state: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One LSTM step (Hochreiter & Schmidhuber 1997): gates i, f, g, o = split(x Wx + state Wh + b),
    c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(c'); returns (h', c')."""
    i, f, g, o = jnp.split(x @ p["wx"] + state @ p["wh"] + p["b"], 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


@dataclass(frozen=True)
class MLP:
    """x (n, in_dim) -> hidden ReLU layers -> linear head (n, out_dim)."""

    in_dim: int
    out_dim: int
    hidden: tuple[int, ...] = (40, 40)
    activation: str = "relu"
    init_sd: float = 0.0  # 0: Glorot-normal weights; else truncated N(0, init_sd^2) (dense_init)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return (*(f"layer_{i}" for i in range(len(self.hidden))), "head")

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        sizes = (self.in_dim, *self.hidden, self.out_dim)
        keys = jax.random.split(key, len(sizes) - 1)
        return {
            name: dense_init(k, a, b, self.init_sd)
            for name, k, a, b in zip(self.layer_names, keys, sizes[:-1], sizes[1:], strict=True)
        }

    @property
    def film_widths(self) -> tuple[int, ...]:
        """Widths of the layers `features` can modulate (FiLM): the hidden layers."""
        return tuple(self.hidden)

    def features(self, params: dict, x: jax.Array, film_params: Film = None) -> jax.Array:
        """The representation fed to the head; hidden layer i is act(film_i(W x + b)) (module docstring)."""
        act = ACTIVATIONS[self.activation]
        for i, name in enumerate(self.layer_names[:-1]):
            x = act(film(dense(params[name], x), None if film_params is None else film_params[i]))
        return x

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        return dense(params["head"], self.features(params, x))

    def shared_axes(self, tree: Any, tasks: int) -> tuple[Any, Any]:
        """(tree, vmap axes) for parameters shared by `tasks` vmapped tasks (keep_shared)."""
        return keep_shared(tree, tasks)


def conv_init(key: jax.Array, c_in: int, c_out: int) -> dict[str, jax.Array]:
    """A 3x3 convolution (Glorot-normal, as MAML's Xavier init) followed by batch-norm scale and offset."""
    w = jax.nn.initializers.glorot_normal(in_axis=(0, 1, 2), out_axis=3)(key, (3, 3, c_in, c_out))
    return {"w": w, "scale": jnp.ones((c_out,), jnp.float32), "offset": jnp.zeros((c_out,), jnp.float32)}


def patches3x3(x: jax.Array, stride: int) -> jax.Array:
    """The 'SAME' 3x3 patches of x (c, n, h, w) at `stride`: (9 c, n, h', w'), features ordered (kernel
    row, kernel column, channel) as an HWIO kernel's rows; 9 strided slices of the zero-padded input,
    joined on the leading (channel) axis, where each is one contiguous block."""
    h, wd = x.shape[-2:]
    ho, wo = -(-h // stride), -(-wd // stride)
    ph, pw = max((ho - 1) * stride + 3 - h, 0), max((wo - 1) * stride + 3 - wd, 0)
    xp = jnp.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    cols = [xp[:, :, i : i + span_h : stride, j : j + span_w : stride] for i in range(3) for j in range(3)]
    return jnp.concatenate(cols, 0)


def conv3x3(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """'SAME' 3x3 convolution of x (c, n, h, w) by an HWIO kernel: the kernel matrix (c_out, 9 c) times
    the patches (9 c, n h' w'), equal to lax.conv_general_dilated.

    On XLA's CPU backend a convolution inside a while loop (our lax.scan of SVI steps) ran 15-20x
    slower than the same step dispatched alone, and vmapping one over per-task kernels (MAML's adapted
    weights) gives a grouped convolution, slower still; patches times a matrix are plain (batched)
    matmuls in both cases (XLA's own patch op also lowers to a grouped convolution). Channels first
    makes the patches 9 contiguous copies and every matmul a long row of positions; with the one-pass
    batch norm below it took the 1-query MAML step of experiments/bench/omniglot from 26.8% to 40.1% of
    the machine's GEMM rate (its RESULTS.md before and after, in the history)."""
    p = patches3x3(x, stride)
    return (w.reshape(-1, w.shape[-1]).T @ p.reshape(p.shape[0], -1)).reshape(-1, *p.shape[1:])


def xla_conv3x3(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """'SAME' 3x3 convolution of x (c, n, h, w) by XLA's convolution op (the fast path on accelerators)."""
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("CNHW", "HWIO", "CNHW")
    )


CONVOLUTIONS = {"patches": conv3x3, "xla": xla_conv3x3}


def per_channel(v: jax.Array) -> jax.Array:
    """A per-channel vector (c,) shaped to broadcast over channels-first images (c, n, h, w)."""
    return v[:, None, None, None]


def batch_norm(x: jax.Array, scale: jax.Array, offset: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Normalise each channel of x (c, n, h, w) with the mean and variance of this set (all images and
    positions): transductive batch norm, as MAML uses it inside the inner loop (no running averages).
    One pass, var = E[x^2] - E[x]^2 (clipped at 0), so that XLA fuses both moments into one reduction
    and the backward pass stays short (in a per-op profile of the standard-protocol MAML step, the
    two-pass variance's extra elementwise passes were among its larger non-matmul costs); float32
    loses log10(1 + mean^2 / var) of its 7 digits to the cancellation, about 2 at |mean| = 10 sd."""
    axes = (-3, -2, -1)  # images, rows, columns of one set
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=axes, keepdims=True) - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + eps) * per_channel(scale)
    return x * inv + (per_channel(offset) - mean * inv)


def max_pool2x2(h: jax.Array) -> jax.Array:
    """2x2 max pooling at stride 2 of channels-first h (c, n, h, w), 'SAME' (odd sides padded with
    -inf): a reshape and two pairwise selections, whose gradient is elementwise, in place of
    reduce_window, whose gradient (select-and-scatter) is slow on XLA's CPU backend inside a lax.scan.

    Not `max(axis=...)`: its gradient divides by the count of inputs equal to the stored maximum,
    which XLA may recompute in another fusion with other rounding; then no input equals it and the
    gradient is 0 / 0 (seen at LLVM's -O0 after batch norm). A selection sends the whole cotangent to
    the input its own comparison picked (of tied inputs, the first; reduce_max splits it among them)."""
    c, n, rows, cols = h.shape
    h = jnp.pad(h, ((0, 0), (0, 0), (0, rows % 2), (0, cols % 2)), constant_values=-jnp.inf)
    h = h.reshape(c, n, -(-rows // 2), 2, -(-cols // 2), 2)
    h = jnp.where(h[..., 0] >= h[..., 1], h[..., 0], h[..., 1])  # (c, n, rows', 2, cols')
    return jnp.where(h[:, :, :, 0] >= h[:, :, :, 1], h[:, :, :, 0], h[:, :, :, 1])


@dataclass(frozen=True)
class Conv4:
    """x (n, s*s) grey images -> `blocks` x [3x3 conv, batch norm, ReLU, downsample] -> mean over
    positions -> linear head (n, out_dim). Downsampling is a stride-2 convolution (MAML's Omniglot
    net) or 2x2 max pooling (the prototypical networks' embedding)."""

    in_dim: int
    out_dim: int
    filters: int = 64
    blocks: int = 4
    downsample: str = "stride"
    conv: str = "patches"
    kernel_copies: bool = True

    @property
    def side(self) -> int:
        side = math.isqrt(self.in_dim)
        if side * side != self.in_dim:
            raise ValueError(f"conv4: inputs must be square grey images, got x_dim {self.in_dim}")
        return side

    @property
    def layer_names(self) -> tuple[str, ...]:
        return (*(f"block_{i}" for i in range(self.blocks)), "head")

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        keys = jax.random.split(key, self.blocks + 1)
        chans = (1, *([self.filters] * self.blocks))
        params = {f"block_{i}": conv_init(keys[i], chans[i], chans[i + 1]) for i in range(self.blocks)}
        return {**params, "head": dense_init(keys[-1], self.filters, self.out_dim)}

    @property
    def stride(self) -> int:
        return 2 if self.downsample == "stride" else 1

    @property
    def film_widths(self) -> tuple[int, ...]:
        """Channels of the blocks `features` can modulate (FiLM)."""
        return (self.filters,) * self.blocks

    def block(self, p: dict, h: jax.Array, pair: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """One block on channels-first images h (c, n, h, w): 3x3 conv, transductive batch norm, FiLM
        (gamma, beta per channel; none by default), ReLU, downsampling."""
        h = batch_norm(CONVOLUTIONS[self.conv](h, p["w"], self.stride), p["scale"], p["offset"])
        if pair is not None:
            h = film(h, (per_channel(pair[0]), per_channel(pair[1])))
        h = jax.nn.relu(h)
        return max_pool2x2(h) if self.downsample == "maxpool" else h

    def features(self, params: dict, x: jax.Array, film_params: Film = None) -> jax.Array:
        """The (n, filters) representation fed to the head, for one set x (n, s*s); block i modulated
        by film_params[i] when given (module docstring)."""
        h = x.reshape(1, x.shape[0], self.side, self.side)  # channels first (conv3x3)
        for i in range(self.blocks):
            h = self.block(params[f"block_{i}"], h, None if film_params is None else film_params[i])
        return jnp.mean(h, axis=(-2, -1)).T

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        return dense(params["head"], self.features(params, x))

    def shared_axes(self, tree: Any, tasks: int) -> tuple[Any, Any]:
        """(tree, vmap axes) for parameters shared by `tasks` vmapped tasks (shared_layout)."""
        return conv_layout(self.conv, self.kernel_copies)(tree, tasks)


def keep_shared(tree: Any, tasks: int) -> tuple[Any, Any]:
    """Parameters shared by vmapped tasks as they are (vmap axis None): for a dense layer one GEMM over
    every task's rows is the fast form (adapt.py's one-step inner loop)."""
    return tree, None


def broadcast_kernels(tree: Any, tasks: int) -> tuple[Any, Any]:
    """Every 3x3 kernel (rank-4 leaf, HWIO) of parameters shared by vmapped tasks given one copy per
    task (vmap axis 0), the rest kept shared. vmap's rule for a matmul with one unbatched side folds
    the task axis into the other side's columns: conv3x3's patches (B, 9 c, positions), contracted on
    their middle axis, which XLA transposes in memory first (and the gradient's too); with batched
    kernels it is one batched matmul, and the copies' gradient one sum over tasks (experiments/bench/
    layout: the steps of conv meta-learners with more than one task per batch, against shared kernels)."""
    per_task = lambda a: jnp.ndim(a) == 4  # noqa: E731
    return (
        jax.tree.map(lambda a: jnp.broadcast_to(a, (tasks, *a.shape)) if per_task(a) else a, tree),
        jax.tree.map(lambda a: 0 if per_task(a) else None, tree),
    )


def shared_layout(cfg: NetConfig) -> Callable[[Any, int], tuple[Any, Any]]:
    """How a net's parameters shared by vmapped tasks are laid out: conv4's patches want one kernel per
    task (broadcast_kernels); XLA's convolution takes shared kernels as they are (per-task ones become
    a slower grouped convolution), as does a dense layer (keep_shared); model.net.kernel_copies = false
    keeps them shared too (experiments/bench/layout compares the two)."""
    return conv_layout(cfg.conv, cfg.kernel_copies) if cfg.kind == "conv4" else keep_shared


def conv_layout(conv: str, kernel_copies: bool) -> Callable[[Any, int], tuple[Any, Any]]:
    """conv4's layout (shared_layout): kernel copies for the patches when kernel_copies, else shared."""
    return broadcast_kernels if conv == "patches" and kernel_copies else keep_shared


def task_vmap(net: MLP | Conv4, fn: Callable[..., Any], shared: Any, *tasks: Any) -> Any:
    """fn(shared, *task) for every task (the leading axis of each array in `tasks`), vmapped, with the
    parameters `shared` laid out for the net (Conv4.shared_axes)."""
    size = jax.tree.leaves(tasks)[0].shape[0]
    tree, axes = net.shared_axes(shared, size)
    return jax.vmap(fn, in_axes=(axes, *(0,) * len(tasks)))(tree, *tasks)


def make_net(cfg: NetConfig, in_dim: int, out_dim: int) -> MLP | Conv4:
    if cfg.kind == "conv4":
        return Conv4(
            in_dim,
            out_dim,
            cfg.filters,
            downsample=cfg.downsample,
            conv=cfg.conv,
            kernel_copies=cfg.kernel_copies,
        )
    return MLP(in_dim, out_dim, cfg.hidden, cfg.activation, cfg.init_sd)


def embedding(net: MLP | Conv4, x_dim: int) -> tuple[Callable[[jax.Array], dict], int]:
    """The net without its head as an embedding f(x) = net.features: its init(key) (every parameter but
    "head") and the feature size d (traced, nothing computed); for metric learners."""

    def init(key: jax.Array) -> dict:
        return {k: v for k, v in net.init(key).items() if k != "head"}

    d = jax.eval_shape(lambda: net.features(init(jax.random.PRNGKey(0)), jnp.zeros((1, x_dim)))).shape[-1]
    return init, d
