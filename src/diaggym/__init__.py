"""DiagGym: a conditional EHR world model and the system around it.

The core library turns EHR tables into versioned cases (``diaggym.cases``) and
cases into the exact text the world model reads and writes
(``diaggym.serialization``, format ``diaggym-v1``).  It never imports Kubeflow,
KServe or Kubernetes clients; those live in ``components/``, ``pipelines/`` and
``serving/``.
"""

__version__ = "0.1.0"

# `gymnasium.make("DiagGym-v0")` works after `import diaggym` when Gymnasium is installed (registry only: cheap).
from diaggym.env.registration import register_gymnasium as _register_gymnasium  # noqa: E402

_register_gymnasium()
