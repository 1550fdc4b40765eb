"""Reinforcement learning for saerl-jax: rollouts, math-verify rewards, GRPO / DAPO losses, the sharded
update and the trainer.

Importing ``rl`` stays light (no JAX): reward worker processes import ``rl.rewards`` and start quickly.
Import the submodules you need (``rl.trainer``, ``rl.losses``, ...).
"""
