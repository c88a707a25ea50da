"""DiagGym simulator server: a KServe model server for the world model (contract 3).

It lives outside the core library (``src/diaggym``) because it imports KServe and FastAPI;
the core never does.  Entry points: ``python -m diaggym_serving`` and ``diaggym serve``.
"""
