"""bayesmeta: meta-learning as hierarchical Bayesian inference (NumPyro models, one SVI engine)."""

from bayesmeta.api import Run, open_run
from bayesmeta.config import Config, ConfigError
from bayesmeta.registry import load_config as load
from bayesmeta.registry import register_family, register_method
from bayesmeta.run import Setup, train

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
