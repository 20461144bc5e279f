"""Meta-reinforcement learning: environments written in JAX and the pieces of policy-gradient methods."""
