"""Reinforcement learning on the environment: the demo policy (``diaggym rl demo``)."""
