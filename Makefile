# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates (or reuses) the project virtualenv in .venv and installs what it needs first.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORK ?= work

.PHONY: demo test lint install clean bench-preprocess

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (DiagGym needs Python 3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diaggym preprocess --source mimic-iv --input data/mimic-iv-demo --out $(WORK)/demo/mimic-iv
	$(VENV)/bin/diaggym preprocess --source agentclinic --input data/agentclinic/agentclinic_medqa.jsonl \
		--out $(WORK)/demo/agentclinic
	$(VENV)/bin/diaggym validate $(WORK)/demo/mimic-iv
	@echo
	@echo "Demo outputs: $(WORK)/demo/mimic-iv/{cases.jsonl,card.md,card.json,exams_per_case.png}"
	@echo "First case as the world model reads it:  $(VENV)/bin/diaggym show $(WORK)/demo/mimic-iv | head -40"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks components pipelines serving

test: $(STAMP) lint
	$(PY) -m pytest -q

bench-preprocess: $(STAMP)
	$(PY) benchmarks/preprocess.py --factor 100

clean:
	rm -rf $(WORK) .pytest_cache
