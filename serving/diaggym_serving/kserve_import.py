"""KServe, imported once with a clean ``sys.argv``.

``import kserve`` parses ``sys.argv`` with KServe's own argparse parser at import time (its module-level
``parse_known_args``), and argparse accepts unique prefixes: an option of ours that happened to prefix one of
KServe's (``--max`` → ``--max_threads``) would be taken, or rejected as ambiguous, by a parser that is not ours.
Every module of this package imports KServe from here, so the first import is always the clean one.
"""

from __future__ import annotations

import sys

_argv = sys.argv
sys.argv = [_argv[0]]
try:
    import kserve
    from kserve.model_server import ModelServer, app
    from kserve.protocol.rest.server import RESTServer
finally:
    sys.argv = _argv

__all__ = ["ModelServer", "RESTServer", "app", "kserve"]
