# Everything installs itself (scripts/install.sh, idempotent): the default stack as .venv, a named stack
# (scripts/stacks/NAME.txt, a Databricks ML runtime's versions) as .venv-NAME with STACK=NAME; each links to
# a venv kept outside the checkout per stack and pin set (~/.cache/hvd_infer/venvs), reused by other clones.
STACK ?= default
VENV ?= $(if $(filter default,$(STACK)),.venv,.venv-$(STACK))
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install demo test test-fast test-stacks docs bench mlflow-ui
install:
	@bash scripts/install.sh --stack $(STACK)

# Where horovod is not installed (dbr-17.3-ml: Databricks ML runtimes since 16.0), torchrun starts the ranks.
demo: install  ## fine-tune the demo model (once), then score the test split on $(NP) ranks
	$(PY) scripts/make_demo.py
	@if $(PY) -c "import horovod" 2>/dev/null; then set -x; $(VENV)/bin/hvd-infer -np $(NP); \
	else set -x; $(VENV)/bin/torchrun --nproc-per-node $(NP) -m hvd_infer; fi

test: install  ## the whole suite on the default stack, the docs site, then the end-to-end core on each named stack
	$(PY) -m pytest tests -q --durations=15
	@$(MAKE) --no-print-directory docs
	@$(MAKE) --no-print-directory test-stacks

test-fast: install  ## the tests that start no process (no ranks, servers, Spark): under 3 minutes
	$(PY) -m pytest tests -q -m "not slow"

# The named stacks: each installed into .venv-NAME, then the end-to-end core (tests/stacks: 2 ranks equal to a
# plain forward, kill and resume, MLflow, the runtime's Spark path, the demo job equal to the default
# stack's labels), each task and the embedding pooling against the stack's own transformers and
# sentence-transformers (the non-slow tests of test_tasks.py and test_embedding.py).
STACKS ?= dbr-15.4-ml dbr-17.3-ml
test-stacks:
	@$(MAKE) --no-print-directory demo STACK=default
	@for s in $(STACKS); do \
	  bash scripts/install.sh --stack $$s && \
	  .venv-$$s/bin/python -m pytest tests/stacks tests/test_tasks.py tests/test_embedding.py -q -m "stack or not slow" \
	    -W ignore::DeprecationWarning || exit 1; \
	done

# The docs site (mkdocs.yml, docs/) into site/: the configuration reference and conf/example.yaml are written
# from hvd_infer/config.py first; --strict fails on a broken link or a page missing from the nav.
docs: install
	$(PY) scripts/config_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

bench: install
	$(PY) scripts/bench.py

mlflow-ui: install  ## the demo's MLflow runs at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///demo/mlflow.db --host 127.0.0.1 --port 5000
