# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates (or reuses) the project virtualenv in .venv and installs what it needs first.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORK ?= work
DEMO_RUN := $(WORK)/runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint install clean bench-preprocess system-deps vllm-venv checkov-venv verl-interaction

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (DiagGym needs Python 3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	DIAGGYM_WORK=$(WORK) $(VENV)/bin/diaggym pipeline run --local --config demo --work $(WORK)/pipeline
	DIAGGYM_WORK=$(WORK) $(PY) pipelines/demo_serve.py --work $(WORK)/pipeline
	@echo "  dataset card:        $$(ls -td $(WORK)/pipeline/outputs/*/preprocess/card | head -1)"
	@echo "  MLflow UI:           $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORK))/mlflow.db"
	@echo "                       then http://127.0.0.1:5000/#/models/diaggym (the registry: versions, aliases, gate reasons)"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks components pipelines serving

# Debian packages the integration tests start or call: prometheus (server + promtool), chromium (the
# hand-play page in a headless browser), postgresql (the registry's backend in tests), kubectl (kustomize).
SYSTEM_DEPS := promtool:prometheus chromium:chromium initdb:postgresql kubectl:kubernetes-client
system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null || [ -x /usr/lib/postgresql/15/bin/$$cmd ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing Debian packages:$$missing"; \
		$$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || { \
			$$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends $$missing; }; fi

# vLLM's CPU build in its own venv (.venv-vllm) for the real-vLLM integration tests; instant once installed.
vllm-venv:
	bash serving/vllm/install.sh

# checkov (the manifest tests run it over the rendered kustomize and Helm output) in its own venv: it pins older
# networkx/packaging than the project's environment allows.
checkov-venv:
	test -x .venv-checkov/bin/checkov || { $(PYTHON) -m venv .venv-checkov && \
		.venv-checkov/bin/pip install --quiet 'checkov==3.3.30'; }

# verl's BaseInteraction (the verl adapter's base class) into .venv without its dependencies: only verl 0.7 ships
# verl.interactions (0.8+ dropped it), and its declared deps (numpy<2, ray, wandb...) and newer verls' transformers
# pin would break the world model's environment; the interaction API needs only the `verl` extra (pyproject.toml), which dev includes.
verl-interaction: $(STAMP)
	$(PY) -c "import verl.interactions.base" 2>/dev/null || \
		$(PY) -m pip install --quiet --no-deps 'verl==0.7.1'

test: $(STAMP) lint system-deps vllm-venv checkov-venv verl-interaction
	$(PY) -m pytest -q

bench-preprocess: $(STAMP)
	$(PY) benchmarks/preprocess.py --factor 100

clean:
	rm -rf $(WORK) .pytest_cache
