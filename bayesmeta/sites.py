"""NumPyro plumbing shared by all models: pytree parameters and the mean-scaled likelihood."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from numpyro.handlers import scale


def site_names(prefix: str, tree: Any) -> list[str]:
    """Site names `prefix.layer.leaf` for the leaves of a nested dict, in tree order."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [".".join([prefix, *(str(k.key) for k in path)]) for path, _ in paths]


RATES = "inner_lr"
"""Prefix of the learned inner step sizes (adapt.learned_rates): sites `inner_lr.<layer>.<leaf>`."""
LAYER = re.compile(r"(layer|block)_\d+|head")
"""Layer names of bayesmeta.nets (MLP layer_i, Conv4 block_i, the head)."""
KERNEL_AXES = {2: ("in", "out"), 4: ("row", "column", "in", "out")}
"""Axes of a dense kernel (in, out) and of a 3x3 convolution kernel (HWIO)."""
LEAVES = {"w": "weights", "b": "bias", "scale": "batch-norm scale", "offset": "batch-norm offset"}


class SiteLayout(NamedTuple):
    """How a site is stored in ArviZ: a variable name without dots, named dims, and what it is."""

    name: str
    dims: list[str]
    description: str


def site_layout(site: str, ndim: int) -> SiteLayout:
    """The ArviZ layout of a parameter or latent site of `ndim` axes, from its role in bayesmeta's
    building blocks: layer leaves `net.layer.w|b|scale|offset` (param_tree), Gaussian weights
    `net.layer` with their `.loc`/`.rho` and the `net_bias.layer` leaves beside them
    (bayesian_layers), learned rates `inner_lr.layer.leaf` (leading axis: the inner step). Dims are
    `<net>_<layer>_<axis>` (theta_layer_0_in, theta_layer_0_out), so a layer's kernel, bias and
    variational parameters share their dims; a site of no known role gets `<name>_axis_<i>`."""
    parts = site.split(".")
    name = "_".join(parts)
    if len(parts) > 1 and parts[-1] in ("loc", "rho"):
        inner = site_layout(".".join(parts[:-1]), ndim)
        what = "mean" if parts[-1] == "loc" else f"rho (sd = {SD_FLOOR:.3g} + softplus(rho))"
        return SiteLayout(
            name, inner.dims, f"{what} of the mean-field Gaussian q over the {inner.description}"
        )
    if parts[0] == RATES and len(parts) > 1 and ndim >= 1:
        entries = _layer_axes(parts, ndim - 1)  # Meta-SGD: one rate per entry
        dims = ["inner_lr_step", *(entries[0] if entries else [])]
        return SiteLayout(name, dims, f"learned inner step size of {'.'.join(parts[1:])}")
    axes = _layer_axes(parts, ndim)
    if axes is not None:
        return SiteLayout(name, *axes)
    return SiteLayout(name, [f"{name}_axis_{i}" for i in range(ndim)], f"meta-parameter {site}")


def _layer_axes(parts: list[str], ndim: int) -> tuple[list[str], str] | None:
    """Dims and description of a layer leaf (`net.layer.leaf`, or `net.layer` for a Gaussian kernel and
    `net_bias.layer` for its bias), or None when the site is not one."""
    leaf = parts[-1]
    if leaf in LEAVES and len(parts) > 2:
        layer, role = parts[:-1], leaf
    elif LAYER.fullmatch(leaf) and len(parts) > 1:
        layer, role = parts, ("b" if parts[0].endswith("_bias") else "w")
    else:
        return None
    axes = KERNEL_AXES.get(ndim) if role == "w" else ("out",) if ndim == 1 else None
    if axes is None:
        return None
    stem = "_".join([layer[0].removesuffix("_bias"), *layer[1:]])
    net = ".".join([layer[0].removesuffix("_bias"), *layer[1:-1]])
    return [f"{stem}_{a}" for a in axes], f"{LEAVES[role]} ({', '.join(axes)}) of layer {layer[-1]} of {net}"


def param_tree(prefix: str, init: Callable[[jax.Array], Any]) -> Any:
    """Register every leaf of the pytree init(key) as a `numpyro.param` site; return the tree.

    The initialiser runs lazily, once, only when a site is not substituted (SVI.init, seeded runs).
    """
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(shapes)
    cache: dict[str, list] = {}

    def lazy(i: int) -> Callable[[jax.Array], jax.Array]:
        def leaf(key: jax.Array) -> jax.Array:
            if "leaves" not in cache:
                cache["leaves"] = jax.tree.leaves(init(key))
            return cache["leaves"][i]

        return leaf

    values = [numpyro.param(name, lazy(i)) for i, name in enumerate(site_names(prefix, shapes))]
    assert len(values) == len(leaves)
    return jax.tree.unflatten(treedef, values)


def tree_from_params(prefix: str, init: Callable[[jax.Array], Any], params: dict) -> Any:
    """The pytree `param_tree(prefix, init)` registered, read back from a dict of fitted params."""
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    return jax.tree.unflatten(jax.tree.structure(shapes), [params[k] for k in site_names(prefix, shapes)])


DRAW_CHECK = "draw_support_loss"


def record_draw_check(start: jax.Array, end: jax.Array) -> None:
    """Record each task's support loss at this draw's start and after its adaptation, (T, 2), at site
    DRAW_CHECK: the engine counts a draw whose loss ends above its start (or is not finite) as blown up."""
    numpyro.deterministic(DRAW_CHECK, jnp.stack([start, end], -1))


def observe(likelihood: Any, out: jax.Array, y: jax.Array | None, name: str = "y") -> None:
    """y (T, n, ...) ~ likelihood(out) under plates (tasks, points), scaled to a mean over both.

    The mean makes the ELBO a per-point loss, as in the papers, so their KL weights beta carry over.
    The likelihood's own parameters are registered here (a learned noise sd: `in_model`), and its
    deterministic sites recorded: the predictive mean "f" (and a heteroscedastic head's per-point sd).
    """
    likelihood = likelihood.in_model()
    n_tasks, n_points = out.shape[:2]
    for site, value in likelihood.sites(out).items():
        numpyro.deterministic(site, value)
    with (
        numpyro.plate("tasks", n_tasks, dim=-2),
        numpyro.plate("points", n_points, dim=-1),
        scale(scale=1.0 / (n_tasks * n_points)),
    ):
        numpyro.sample(name, likelihood.dist(out), obs=y)


# ---------------------------------------------------------------------------------------------- #
# Stochastic weights and activations (meta-regularization, Yin et al. 2020): each is a latent sample
# site declared in the model with its prior and in the guide with its variational family, both under
# handlers.scale(beta), so TraceMeanField_ELBO adds beta * KL(q || p) to the mean per-point NLL.


SD_FLOOR = 1.1920929e-07  # float32 epsilon, added to softplus(rho) as TFP's mean-field posterior does


def posterior_sd(rho: jax.Array) -> jax.Array:
    """sd = eps + softplus(rho): finite KL even for rho = -50 (softplus alone underflows its square)."""
    return SD_FLOOR + jax.nn.softplus(rho)


def gaussian_weights_prior(
    prefix: str, shapes: dict[str, tuple[int, ...]], beta: float, prior_sd: float = 1.0
) -> dict[str, jax.Array]:
    """Model side: W_k ~ N(0, prior_sd^2 I) for each named shape, KL weighted by beta."""
    import numpyro.distributions as dist

    with scale(scale=beta):
        return {
            k: numpyro.sample(f"{prefix}.{k}", dist.Normal(0.0, prior_sd).expand(s).to_event(len(s)))
            for k, s in shapes.items()
        }


def gaussian_weights_guide(
    prefix: str, shapes: dict[str, tuple[int, ...]], beta: float, loc_sd: float = 0.1, rho_init: float = -50.0
) -> dict[str, jax.Array]:
    """Guide side: W_k ~ N(loc_k, posterior_sd(rho_k)^2), mean-field.

    Initialised as loc ~ N(0, loc_sd^2), rho ~ N(rho_init, 0.1^2) (TFP's DenseReparameterization)."""
    import numpyro.distributions as dist

    out = {}
    with scale(scale=beta):
        for k, s in shapes.items():
            loc = numpyro.param(f"{prefix}.{k}.loc", lambda key, s=s: loc_sd * jax.random.normal(key, s))
            rho = numpyro.param(
                f"{prefix}.{k}.rho", lambda key, s=s: rho_init + 0.1 * jax.random.normal(key, s)
            )
            out[k] = numpyro.sample(f"{prefix}.{k}", dist.Normal(loc, posterior_sd(rho)).to_event(len(s)))
    return out


def kernel_shapes(net: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the kernels "w" of every layer of a dense network, by layer name."""
    return {k: v["w"].shape for k, v in jax.eval_shape(net.init, jax.random.PRNGKey(0)).items()}


def _deterministic_init(net: Any) -> Callable[[jax.Array], dict]:
    """init of a network's non-kernel leaves: a dense layer's bias alone (site `prefix_bias.layer`),
    else the dict of its other leaves (batch-norm scale and offset)."""

    def rest(layer: dict) -> Any:
        return layer["b"] if set(layer) == {"w", "b"} else {k: v for k, v in layer.items() if k != "w"}

    return lambda key: {k: rest(v) for k, v in net.init(key).items()}


def _assemble(kernels: dict, det: dict) -> dict:
    """A network's params from its kernels and its deterministic leaves, by layer name."""
    return {
        k: {"w": w, **(det[k] if isinstance(det[k], dict) else {"b": det[k]})} for k, w in kernels.items()
    }


def bayesian_layers(prefix: str, net: Any, beta: float, prior_sd: float = 1.0) -> dict:
    """Model side of a Bayes-by-backprop network: kernels "w" are latent (N(0, prior_sd^2), KL x beta),
    every other leaf (biases; batch-norm scale and offset) a deterministic `numpyro.param` at its
    initial value (as TFP's DenseReparameterization); returns net's params."""
    kernels = gaussian_weights_prior(prefix, kernel_shapes(net), beta, prior_sd)
    return _assemble(kernels, param_tree(f"{prefix}_bias", _deterministic_init(net)))


def posterior_mean_layers(prefix: str, net: Any, params: dict) -> dict:
    """The `bayesian_layers` network at the posterior means of its kernels, read from fitted params."""
    kernels = {k: params[f"{prefix}.{k}.loc"] for k in kernel_shapes(net)}
    return _assemble(kernels, tree_from_params(f"{prefix}_bias", _deterministic_init(net), params))


def gaussian_weights_kl(params: dict[str, jax.Array], prefix: str, prior_sd: float = 1.0) -> jax.Array:
    """KL(N(loc, sd^2) || N(0, prior_sd^2)), sd = posterior_sd(rho), summed over weights under `prefix`."""
    total = 0.0
    for name, loc in params.items():
        if name.startswith(prefix + ".") and name.endswith(".loc"):
            sd = posterior_sd(params[name[:-4] + ".rho"])
            total += jax.numpy.sum(jax.numpy.log(prior_sd / sd) + (sd**2 + loc**2) / (2 * prior_sd**2) - 0.5)
    return total


def bottleneck(name: str, mean: jax.Array, sd: jax.Array | None, beta: float) -> jax.Array:
    """Per-point latent z (T, n, d) under plates (tasks, points) scaled to beta / (T n).

    Model (sd is None): z ~ N(0, I). Guide: z ~ N(mean, sd^2), amortized on the inputs. The scale makes
    the ELBO add beta * (mean over points of KL summed over the d dimensions).
    """
    import numpyro.distributions as dist

    n_tasks, n_points = mean.shape[:2]
    d = dist.Normal(0.0, 1.0).expand(mean.shape[-1:]) if sd is None else dist.Normal(mean, sd)
    with (
        numpyro.plate(f"{name}_tasks", n_tasks, dim=-2),
        numpyro.plate(f"{name}_points", n_points, dim=-1),
        scale(scale=beta / (n_tasks * n_points)),
    ):
        return numpyro.sample(name, d.to_event(1))
