"""saerl-jax: SAE-guided data engineering for LLM RL post-training, in JAX."""

__version__ = "0.1.0"
