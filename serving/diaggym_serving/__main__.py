"""``python -m diaggym_serving``: the container entry point (see :mod:`diaggym_serving.server`)."""

import sys

from diaggym_serving.server import main

if __name__ == "__main__":
    sys.exit(main())
