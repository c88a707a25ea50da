"""Evaluating world models and baselines on held-out cases (fidelity, diversity, format, cost)."""
