"""Task families and methods by name: the built-ins, installed plugins and import paths.

A config names a family (`task.family`) or a method (`model.method`) in one of three ways:

* a registered name: a built-in, or one added with `register_family` / `register_method`;
* an installed plugin's name: an entry point in the group `bayesmeta.families` or `bayesmeta.methods`
  (`[project.entry-points."bayesmeta.families"] quadratic = "mypkg.tasks:Quadratic"`);
* an import path `"package.module:Name"`, which needs no registration at all.

The run folder's config.toml records the name as given, so `evaluate`, `sample` and `report` find the
same family and method again. `load_config` is the config loader that knows them: it validates the
family's and the method's own options and writes their defaults into the resolved config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bayesmeta import config as config_mod
from bayesmeta.config import Config, ConfigError, ModelConfig, TaskConfig, parse_params
from bayesmeta.method import Context, Method, MethodSpec

__all__ = [
    "Context",
    "build_method",
    "families",
    "load_config",
    "make_family",
    "method_spec",
    "methods",
    "register_family",
    "register_method",
]


@dataclass
class Registry:
    """Names -> objects of one kind: built-ins (loaded lazily), registered ones, entry points, and
    import paths; every object found is checked against the kind's protocol before it is used."""

    kind: str
    key: str  # the config key that names one, for messages
    group: str  # the entry-point group of installed plugins
    builtins: Callable[[], Mapping[str, Any]]
    problem: Callable[[Any], str | None]  # what is wrong with an object of this kind, if anything
    added: dict[str, Any] = field(default_factory=dict)

    def register(self, name: str, obj: Any = None) -> Any:
        """Add `obj` under `name` (usable as a decorator: `@register_family("quadratic")`)."""

        def add(o: Any) -> Any:
            problem = self.problem(o)
            if problem:
                raise TypeError(f"{self.kind} {name!r}: {problem}")
            if name in self.names() and self.get(name) is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered (to {self.get(name)!r})")
            self.added[name] = o
            return o

        return add if obj is None else add(obj)

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted({*self.builtins(), *self.added, *self._entry_points()})

    def get(self, name: str, key: str | None = None) -> Any:
        """The object `name` refers to; a ConfigError naming the config key when there is none."""
        key = key or self.key
        found = {**self.builtins(), **self.added}
        if name in found:
            return found[name]
        eps = self._entry_points()
        if name in eps:
            obj = _load(lambda: eps[name].load(), f"{key}: entry point {eps[name].value!r}")
            return self._checked(name, obj, key)
        if ":" in name:
            return self._checked(name, import_path(name, key), key)
        raise ConfigError(
            f"{key}: expected one of {', '.join(map(repr, self.names()))} or an import path "
            f"'package.module:Name', got {name!r}"
        )

    def _checked(self, name: str, obj: Any, key: str) -> Any:
        problem = self.problem(obj)
        if problem:
            raise ConfigError(f"{key}: {name!r} is not a bayesmeta {self.kind}: {problem}")
        return obj


def _load(load: Callable[[], Any], what: str) -> Any:
    try:
        return load()
    except Exception as e:  # a plugin's import error of any kind is a config problem, in one line
        raise ConfigError(f"{what}: cannot load it: {type(e).__name__}: {e}") from None


def import_path(path: str, key: str) -> Any:
    """The object at "package.module:Name" (attribute chains allowed after the colon)."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"{key}: expected an import path 'package.module:Name', got {path!r}")
    try:
        obj = import_module(module)
    except Exception as e:
        raise ConfigError(f"{key}: cannot import {module!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _params_problem(obj: Any) -> str | None:
    params = getattr(obj, "Params", None)
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        return "it has no Params dataclass (its options; an empty @dataclass if it has none)"
    return None


def _family_problem(cls: Any) -> str | None:
    """A family is a class built as cls(params=cls.Params(...), shots=, queries=) with check and sample."""
    if not isinstance(cls, type):
        return f"expected a class, got {type(cls).__name__}"
    missing = [m for m in ("check", "sample") if not callable(getattr(cls, m, None))]
    if missing:
        return f"it lacks {', '.join(missing)} (see bayesmeta.tasks.Family)"
    return _params_problem(cls)


def _method_problem(spec: Any) -> str | None:
    if not isinstance(spec, MethodSpec):
        return "it lacks Params, requires, check or build (see bayesmeta.method.MethodSpec)"
    for key, allowed in spec.requires.items():
        choices = _setting_choices(key)
        if choices is None:
            return f"its requires names {key!r}, which is not a [model] setting with choices"
        if not allowed or set(allowed) - set(choices):
            return f"its requires gives {key!r} {list(allowed)}; expected some of {list(choices)}"
    return _params_problem(spec)


def _setting_choices(key: str) -> list[str] | None:
    """The allowed values of a [model] setting with choices (e.g. 'net.kind'), None if there is none."""
    *path, name = key.split(".")
    try:
        owner = functools.reduce(getattr, path, ModelConfig())
    except AttributeError:
        return None
    found = (
        [f for f in dataclasses.fields(owner) if f.name == name] if dataclasses.is_dataclass(owner) else []
    )
    choices = found[0].metadata.get("choices") if found else None
    return list(choices() if callable(choices) else choices) if choices else None


def _builtin_families() -> Mapping[str, Any]:
    from bayesmeta.tasks import FAMILIES

    return FAMILIES


def _builtin_methods() -> Mapping[str, Any]:
    from bayesmeta import models

    return models.METHODS


families = Registry("family", "task.family", "bayesmeta.families", _builtin_families, _family_problem)
methods = Registry("method", "model.method", "bayesmeta.methods", _builtin_methods, _method_problem)
register_family = families.register
register_method = methods.register


def method_spec(name: str) -> MethodSpec:
    return methods.get(name)


def unsupported(cfg: ModelConfig, requires: Mapping[str, tuple[str, ...]]) -> str | None:
    """The first [model] setting outside a method's declared `requires`, as a one-line problem."""
    for key, allowed in requires.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            return f"model.{key}: method {cfg.method!r} supports {choices}; got {value!r}"
    return None


def method_params(cfg: ModelConfig) -> Any:
    """Validate [model.params] against the method's Params, its declared `requires`, then the method's
    own cross-checks."""
    spec = method_spec(cfg.method)
    params = parse_params(spec.Params, cfg.params, "model")
    problem = unsupported(cfg, spec.requires) or spec.check(cfg, params)
    if problem:
        raise ConfigError(problem)
    return params


def make_family(cfg: TaskConfig, prefix: str = "task") -> Any:
    """Build the family named in a TaskConfig; its `params` table is validated by the family."""
    cls = families.get(cfg.family, f"{prefix}.family")
    family = cls(params=parse_params(cls.Params, cfg.params, prefix), shots=cfg.shots, queries=cfg.queries)
    problem = family.check()
    if problem:
        raise ConfigError(f"{prefix}.{problem}")
    return family


def build_method(cfg: ModelConfig, x_dim: int, y_dim: int, context: Context | None = None) -> Method:
    """Construct the method named by cfg.method for inputs of x_dim and outputs of y_dim."""
    return method_spec(cfg.method).build(cfg, method_params(cfg), x_dim, y_dim, context or Context())


def with_options(cfg: Config) -> Config:
    """Validate the family's and the method's options and fill in their defaults, so that the resolved
    config (and the run's config.toml) lists every option with the value the run used (an option
    left unset, None, is omitted: TOML has no null)."""
    task = _table(make_family(cfg.task, "task").params)
    eval_task = _table(make_family(cfg.eval.task, "eval.task").params)
    model = _table(method_params(cfg.model))
    return dataclasses.replace(
        cfg,
        task=dataclasses.replace(cfg.task, params=task),
        model=dataclasses.replace(cfg.model, params=model),
        eval=dataclasses.replace(cfg.eval, task=dataclasses.replace(cfg.eval.task, params=eval_task)),
    )


def _table(params: Any) -> dict:
    return {k: v for k, v in config_mod.to_dict(params).items() if v is not None}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """config.load (the schema), then the family's and the method's options validated and completed. A
    problem of the file itself (it fails without the overrides too) names the file, e.g. a truncated
    run config whose last value was cut short."""
    try:
        return with_options(config_mod.load(path, overrides))
    except ConfigError as e:
        if path is None or str(e).startswith(str(path)):
            raise
        try:
            with_options(config_mod.load(path))
        except ConfigError as alone:
            raise ConfigError(f"{path}: {alone}") from None
        raise
