# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test demo demo-pipeline bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) jobs/demo.py

# The full pipeline: generate -> ingest -> Ray Train (ATS-10, U-10) -> MLflow. Not yet `make demo` (see README).
demo-pipeline: $(STAMP)
	$(PY) jobs/demo_pipeline.py

bench: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/estimator_variance.py --threads 1
	PYTHONPATH=. $(PY) benchmarks/estimator_cost.py
	PYTHONPATH=. $(PY) benchmarks/estimator_training.py --threads 1
	PYTHONPATH=. $(PY) benchmarks/io_patches.py

clean:
	rm -rf $(VENV) build *.egg-info
