# Everything installs itself (scripts/install.sh, idempotent, into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install demo test test-fast bench mlflow-ui
install:
	@bash scripts/install.sh

demo: install  ## fine-tune the demo model (once), then score the test split on $(NP) ranks
	$(PY) scripts/make_demo.py
	$(VENV)/bin/hvd-infer -np $(NP)

test: install  ## the whole suite: unit tests and real multi-rank, Spark and MLflow runs
	$(PY) -m pytest tests -q

test-fast: install
	$(PY) -m pytest tests -q -m "not slow"

bench: install
	$(PY) scripts/bench.py

mlflow-ui: install  ## the demo's MLflow runs at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///demo/mlflow.db --host 127.0.0.1 --port 5000
