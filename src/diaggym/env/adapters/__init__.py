"""Adapters from :class:`diaggym.env.DiagEnv` to RL libraries; each imports its library only when used."""
