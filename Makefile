# Everything installs itself (scripts/install.sh, idempotent, into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install demo test test-fast test-stacks bench mlflow-ui
install:
	@bash scripts/install.sh

demo: install  ## fine-tune the demo model (once), then score the test split on $(NP) ranks
	$(PY) scripts/make_demo.py
	$(VENV)/bin/hvd-infer -np $(NP)

test: install  ## the whole suite: unit tests and real multi-rank, Spark and MLflow runs
	$(PY) -m pytest tests -q

test-fast: install
	$(PY) -m pytest tests -q -m "not slow"

# The named stacks (scripts/stacks/NAME.txt, Databricks ML runtimes): each installed into .venv-NAME, then
# the end-to-end core (tests/stacks), each task and the embedding pooling against the stack's own
# transformers and sentence-transformers (the non-slow tests of test_tasks.py and test_embedding.py).
STACKS ?= dbr-15.4-ml dbr-17.3-ml
test-stacks:
	@for s in $(STACKS); do \
	  bash scripts/install.sh --stack $$s && \
	  .venv-$$s/bin/python -m pytest tests/stacks tests/test_tasks.py tests/test_embedding.py -q -m "not slow" \
	    -W ignore::DeprecationWarning || exit 1; \
	done

bench: install
	$(PY) scripts/bench.py

mlflow-ui: install  ## the demo's MLflow runs at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///demo/mlflow.db --host 127.0.0.1 --port 5000
