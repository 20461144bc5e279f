"""bayesmeta: meta-learning as hierarchical Bayesian inference (NumPyro models, one SVI engine)."""

from bayesmeta.config import Config, ConfigError, load
from bayesmeta.run import Setup, train

__all__ = ["Config", "ConfigError", "Setup", "load", "train"]
__version__ = "0.1.0"
