"""Reinforcement learning for saerl-jax: rewards now; rollouts, GRPO / DAPO losses and the trainer follow.

Importing ``rl`` stays light (no JAX) so reward worker processes start quickly.
"""
