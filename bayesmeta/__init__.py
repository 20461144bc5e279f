"""bayesmeta: meta-learning as hierarchical Bayesian inference (NumPyro models, one SVI engine)."""

from bayesmeta.heap import retain_freed_memory

retain_freed_memory()  # before JAX's CPU backend starts its threads (bayesmeta.heap)


from bayesmeta.api import Run, open_run  # noqa: E402
from bayesmeta.config import Config, ConfigError  # noqa: E402
from bayesmeta.registry import load_config as load  # noqa: E402
from bayesmeta.registry import register_family, register_method  # noqa: E402
from bayesmeta.run import Setup, train  # noqa: E402

__all__ = [
    "Config",
    "ConfigError",
    "Run",
    "Setup",
    "load",
    "open_run",
    "register_family",
    "register_method",
    "train",
]
__version__ = "0.1.0"
