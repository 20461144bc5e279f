"""TOML configs validated into frozen dataclasses; every error names the key and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"
INT_LIMIT = 10**9
"""Integers without an explicit bound must lie in [-INT_LIMIT, INT_LIMIT]: step and task counts beyond
it are typos (a run of 10^9 steps takes days), and larger values overflow the int32/int64 of JAX/NumPy."""
SEED_MAX = 2**32 - 1
"""Seeds are uint32 (jax.random.PRNGKey and numpy.random.default_rng take them without overflow)."""
# a run name is one folder name: letters, digits, spaces and punctuation, but no path separator or
# control character, and not starting with "." (so neither "." nor ".." nor a hidden folder), <= 200
NAME_PATTERN = r"[A-Za-z0-9_+=,()\[\]-][A-Za-z0-9 _.+=,()\[\]-]{0,199}"
"""A run name is one folder under runs/: no path separators, so it cannot write elsewhere."""
MAX_CONFIG_BYTES = 1_000_000
"""A config is a few kB; a larger file is not a config (and is not read into memory)."""
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
"""A TOML bare key: every config key is one."""


class ConfigError(ValueError):
    """An invalid config: the message is one line naming the key and what is allowed."""


def opt(
    default: Any,
    *,
    choices: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    pattern: str | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with validation metadata (choices may be a callable returning a list; a string
    must fully match `pattern`)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "pattern": pattern, "doc": doc}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


@dataclass(frozen=True)
class TaskConfig:
    family: str = opt(
        "sinusoid", doc="task family: a registered name or an import path 'package.module:Class'"
    )
    shots: int = opt(10, ge=1, doc="support points per task (per class for classification)")
    queries: int = opt(10, ge=1, doc="query points per task (per class for classification)")
    params: dict = opt({}, doc="family-specific parameters, validated by the family")


@dataclass(frozen=True)
class NetConfig:
    kind: str = opt("mlp", choices=["mlp", "conv4"], doc="MLP, or 4 conv blocks for square images")
    hidden: tuple[int, ...] = opt((40, 40), ge=1, doc="MLP hidden layer widths")
    activation: str = opt("relu", choices=["relu", "tanh", "elu"], doc="MLP activation")
    init_sd: float = opt(
        0.0,
        ge=0,
        doc="MLP weights at init: Glorot-normal (0) or N(0, init_sd^2) truncated at 2 sd (0.01 in the MAML, "
        "HSML and ARML reference code); biases zero",
    )
    filters: int = opt(64, ge=1, doc="conv4 filters per block")
    downsample: str = opt("stride", choices=["stride", "maxpool"], doc="conv4: stride-2 convs or max pooling")
    conv: str = opt(
        "patches",
        choices=["patches", "xla"],
        doc="conv4: patches x matmul (fast on CPU, also inside lax.scan and per-task kernels) or XLA's "
        "convolution (for accelerators); a method without an inner loop predicts with XLA's (forward only, "
        "faster on CPU too)",
    )
    kernel_copies: bool = opt(
        True,
        doc="conv4 with patches: kernels shared by vmapped tasks get one copy per task (one batched matmul; "
        "false: vmap's default, which makes XLA transpose every task's patches; nets.broadcast_kernels)",
    )


NOISE = ("fixed", "learned", "heteroscedastic")
"""model.noise: how the Gaussian likelihood's sd is set (bayesmeta.likelihoods.make_likelihood)."""


@dataclass(frozen=True)
class ModelConfig:
    method: str = opt("maml", doc="method: a registered name or an import path 'package.module:Spec'")
    net: NetConfig = opt(NetConfig())
    inner_steps: int = opt(1, ge=0, doc="inner gradient steps during meta-training")
    inner_lr: float = opt(0.01, gt=0, doc="inner step size alpha")
    inner_clip: float = opt(
        0.0,
        ge=0,
        doc="clip each inner-loop gradient to this global norm, per task (0 = off): the inner loops of "
        "bayesmeta.adapt (MAML and the methods built on it), BMAML's SVGD (per particle) and the neural "
        "prior's VI steps; a task with large targets can make plain inner SGD blow up",
    )
    first_order: bool = opt(False, doc="drop second derivatives of the inner loop")
    adapt: str = opt("all", choices=["all", "head"], doc="which parameters the inner loop adapts")
    remat: str = opt(
        "none",
        choices=["none", "sqrt", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"],
        doc="rematerialise inner steps in the backward pass: a jax.checkpoint policy per step, or 'sqrt' "
        "(segments of ~sqrt(steps) steps, ~2 sqrt(steps) carries kept): memory for time",
    )
    likelihood: str = opt("gaussian", choices=["gaussian", "categorical"])
    noise_sd: float = opt(
        math.sqrt(0.5),
        gt=0,
        doc="Gaussian likelihood sd; sqrt(1/2) makes the NLL equal MSE + const",
    )
    noise: str = opt(
        "fixed",
        choices=list(NOISE),
        doc="Gaussian observation sd: 'fixed' at noise_sd; 'learned', one sd per model (numpyro.param "
        "noise_sd, started at noise_sd); 'heteroscedastic', sd(x) = 0.1 + 0.9 softplus(r(x)) from a second "
        "block of network outputs (noise_sd unused). Inner loops keep the MSE",
    )
    prior_scale: float = opt(0.0, ge=0, doc="sd of a N(0, s^2) prior on theta (MAP); 0 = none")
    params: dict = opt({}, doc="method-specific options, validated by the method")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = opt(2000, ge=1)
    meta_batch: int = opt(25, ge=1, doc="tasks per meta-update")
    devices: int = opt(
        1, ge=1, doc="devices the meta-batch is sharded over (mesh axis 'tasks'); parameters are replicated"
    )
    optimizer: str = opt("adam", choices=["adam", "adamw", "sgd"])
    lr: float = opt(1e-3, gt=0)
    lr_schedule: str = opt(
        "constant",
        choices=["constant", "step", "cosine"],
        doc="the meta learning rate over training: 'step' multiplies it by lr_decay every lr_decay_every "
        "steps (Snell et al. 2017 halve Adam's every 2,000 episodes); 'cosine' decays it to 0 at train.steps",
    )
    lr_decay: float = opt(0.5, gt=0, le=1, doc="the 'step' schedule's factor")
    lr_decay_every: int = opt(2000, ge=1, doc="the 'step' schedule's interval in steps")
    grad_clip: float = opt(0.0, ge=0, doc="global-norm gradient clipping; 0 = off")
    weight_decay: float = opt(1e-4, ge=0, doc="decoupled weight decay of adamw (ignored by adam and sgd)")
    fresh_adam: str = opt(
        "", doc="parameters (a name prefix, or 'all') updated as by a new Adam every step: lr g/(|g|+1e-7)"
    )
    log_every: int = opt(100, ge=1, doc="steps fused into one device call between host updates")
    eval_every: int = opt(1000, ge=1, doc="held-out evaluation interval (multiple of log_every)")
    eval_tasks: int = opt(100, ge=1, doc="held-out tasks used for evaluation during training")
    checkpoint_every: int = opt(1000, ge=1, doc="checkpoint interval (multiple of log_every)")
    diagnostics_every: int = opt(
        0, ge=0, doc="landscape diagnostics interval (multiple of log_every; 0 = off); needs a method's probe"
    )
    diagnostics_tasks: int = opt(16, ge=2, doc="held-out tasks for the landscape diagnostics")
    diagnostics_power_iterations: int = opt(20, ge=1, doc="power iterations for flatness (top Hessian eig)")
    task_gradients: str = opt(
        "batch",
        choices=["batch", "pcgrad"],
        doc="'batch': gradient of the meta-batch loss; 'pcgrad': per-task gradients, Meta-PCGrad, then mean",
    )


@dataclass(frozen=True)
class EvalConfig:
    tasks: int = opt(600, ge=1, doc="evaluation tasks")
    inner_steps: tuple[int, ...] = opt((1, 10), ge=0, doc="test-time inner steps to report")
    batch: int = opt(100, ge=1, doc="tasks per device call, in the evaluation and the training monitor")
    samples: int = opt(1, ge=1, doc="posterior predictive draws per task")
    blown_up_draws: str = opt(
        "keep",
        choices=["keep", "reject"],
        doc="draws whose adapted support loss ends above its start (methods that check their draws: "
        "PLATIPUS, LLAMA) are counted (metric blown_up_draws); 'reject' also replaces them by the task's "
        "accepted draws",
    )
    plot_tasks: int = opt(9, ge=0, le=25, doc="test tasks shown in the prediction plot")
    seed: int = opt(
        1234, ge=0, le=SEED_MAX, doc="seed of the evaluation tasks, shared by runs so methods compare"
    )
    posterior_draws: int = opt(100, ge=1, doc="draws of stochastic meta-parameters kept in the posterior")
    memorization_tasks: int = opt(100, ge=0, doc="tasks for the memorization meter; 0 = off")
    bound_tasks: int = opt(
        20000,
        ge=2,
        doc="the bound's empirical error is over the training tasks the fit saw: all of them up to this "
        "many, else a uniform sample of this many (an estimate, with its standard error)",
    )
    bound_delta: float = opt(0.05, gt=0, le=1, doc="the PAC-Bayes bound holds with probability 1 - delta")
    bound_clip: float = opt(1.0, gt=0, doc="regression loss for the bound: min((y - f)^2 / clip, 1)")
    task: TaskConfig = opt(TaskConfig(), doc="evaluation task family; missing keys come from [task]")


@dataclass(frozen=True)
class Config:
    name: str = opt("default", pattern=NAME_PATTERN, doc="run name: runs/<name>/, a simple folder name")
    seed: int = opt(0, ge=0, le=SEED_MAX)
    task: TaskConfig = opt(TaskConfig())
    model: ModelConfig = opt(ModelConfig())
    train: TrainConfig = opt(TrainConfig())
    eval: EvalConfig = opt(EvalConfig())


# ---------------------------------------------------------------------------------------------- #
def describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """What a field accepts, in words: its type, choices, pattern and bounds."""
    choices = meta.get("choices")
    if choices is not None:
        choices = choices() if callable(choices) else choices
        return "one of " + ", ".join(repr(c) for c in choices)
    if meta.get("pattern") is not None:
        return f"a string matching {meta['pattern']} (not . or ..)"
    origin = typing.get_origin(tp)
    if tp is int or (origin is tuple and typing.get_args(tp)[0] is int):
        meta = _int_bounds(meta)
    bounds = [
        f"{op} {meta[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("le", "<=")) if meta.get(k) is not None
    ]
    name = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a table",
    }.get(tp)
    if name is None and origin is tuple:
        inner = typing.get_args(tp)[0]
        name = {int: "a list of integers", float: "a list of numbers", str: "a list of strings"}.get(inner)
    return (name or str(tp)) + (" " + " and ".join(bounds) if bounds else "")


def _coerce(tp: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """Check one value against its annotated type and bounds; return it in canonical form."""

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{key}: expected {describe(tp, meta)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table of {', '.join(_field_names(tp))}")
        return build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail()
        inner = typing.get_args(tp)[0]
        bounds = {k: meta.get(k) for k in ("ge", "gt", "le")}
        return tuple(_coerce(inner, v, f"{key}[{i}]", bounds) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            fail()
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        meta = _int_bounds(meta)  # fail() describes the same bounds
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail()
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            fail()
        pattern = meta.get("pattern")
        if pattern is not None and (not re.fullmatch(pattern, value) or value in (".", "..")):
            fail()
    elif tp is dict:
        if not isinstance(value, Mapping):
            fail()
        return dict(value)
    choices = meta.get("choices")
    if choices is not None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            fail()
    for k, ok in (
        ("gt", lambda a, b: a > b),
        ("ge", lambda a, b: a >= b),
        ("le", lambda a, b: a <= b),
    ):
        if meta.get(k) is not None and not ok(value, meta[k]):
            fail()
    return value


def _int_bounds(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """An integer's bounds, with +-INT_LIMIT where the field sets none."""
    out = dict(meta)
    if out.get("le") is None:
        out["le"] = INT_LIMIT
    if out.get("ge") is None and out.get("gt") is None:
        out["ge"] = -INT_LIMIT
    return out


def _show(key: object) -> str:
    """A key as written in a message: bare keys as they are, anything else quoted (one line)."""
    return key if isinstance(key, str) and KEY_PATTERN.fullmatch(key) else repr(key)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build[T](cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Validate a mapping into dataclass `cls`: unknown keys, wrong types and bounds are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            raise ConfigError(f"{prefix}{_show(k)}: unknown key; allowed keys: {', '.join(fields)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k, fields[k].metadata) for k, v in data.items()}
    return cls(**kwargs)


def set_dotted(data: dict, dotted: str, raw: str) -> None:
    """Apply one `--set key.sub=value` override; the value is parsed as TOML (else a string)."""
    keys = dotted.split(".")
    if not all(KEY_PATTERN.fullmatch(k) for k in keys):
        raise ConfigError(
            f"--set {dotted!r}: expected a dotted key of names made of letters, digits, _ and -, "
            "e.g. train.steps"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw
    node = data
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a table")
    node[keys[-1]] = value


def _merge(base: Mapping, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def resolve(data: Mapping[str, Any]) -> Config:
    """Raw TOML mapping -> validated Config; [eval.task] inherits what it omits from [task]."""
    data = dict(data)
    for key in ("task", "eval"):
        if not isinstance(data.get(key, {}), Mapping):
            raise ConfigError(f"{key}: expected a table, got {data[key]!r}")
    task = data.get("task", {})
    ev = dict(data.get("eval", {}))
    ev_task = ev.get("task", {})
    if not isinstance(ev_task, Mapping):
        raise ConfigError("eval.task: expected a table")
    base_task = task if ev_task.get("family", task.get("family")) == task.get("family") else {}
    ev["task"] = _merge(base_task, ev_task)
    data["eval"] = ev
    cfg = build(Config, data)
    _check_cross(cfg)
    return cfg


def _check_cross(cfg: Config) -> None:
    t = cfg.train
    if t.meta_batch % t.devices:
        raise ConfigError(
            f"train.meta_batch: expected a multiple of train.devices ({t.devices}), got {t.meta_batch}"
        )
    for key in ("eval_every", "checkpoint_every", "diagnostics_every"):
        if getattr(t, key) % t.log_every:
            raise ConfigError(
                f"train.{key}: expected a multiple of train.log_every ({t.log_every}), got {getattr(t, key)}"
            )
    if cfg.model.noise != "fixed" and cfg.model.likelihood != "gaussian":
        raise ConfigError(
            f"model.noise: {cfg.model.noise!r} needs model.likelihood = 'gaussian' (a categorical "
            "likelihood has no noise sd); set it to 'fixed'"
        )
    if not cfg.eval.inner_steps:
        raise ConfigError("eval.inner_steps: expected a non-empty list of integers >= 0")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (default: the built-in config), apply `key=value` overrides, validate against the
    schema. The family's and the method's own options are validated by bayesmeta.registry.load_config,
    which callers use (this module knows no family or method)."""
    data = read_toml(Path(path) if path is not None else DEFAULT_CONFIG)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=1000")
        k, v = item.split("=", 1)
        set_dotted(data, k.strip(), v.strip())
    return resolve(data)


def read_toml(path: Path) -> dict:
    """A TOML file's table; a missing file, a directory, non-UTF-8 bytes or bad TOML is one line."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a TOML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config file is at most {MAX_CONFIG_BYTES}")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({_one_line(str(e))})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{path}: unreadable ({e.strerror or e})") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def to_dict(cfg: Any) -> dict:
    """Config -> plain nested dict (tuples as lists), ready for TOML or JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def parse_params[T](cls: type[T], params: Mapping[str, Any], prefix: str) -> T:
    """Validate a family's or method's own `params` table."""
    return build(cls, params, prefix + ".params.")
