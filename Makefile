# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Two pytest-xdist workers: much of the suite's wall time is spent waiting on processes it starts (Ray, MLflow, S3,
# jobs/*.py); on a 2-core machine two workers took 11:21 where one took 14:29. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: install test bench-smoke demo demo-memory bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -n $(TEST_WORKERS) -m "not bench_smoke" $(PYTEST_ARGS)

# Each benchmark script run end to end at toy size (--smoke), fresh processes and embedded Rays: slower checks, kept
# out of make test's 15 minutes; .ci/run runs them after the demo (~5 min).
bench-smoke: $(STAMP)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -n $(TEST_WORKERS) -m bench_smoke $(PYTEST_ARGS)

# The full pipeline: generate a reduced Megapixel MNIST -> ingest -> Ray Train (ATS-10, U-10) -> MLflow (~7 min).
demo: $(STAMP)
	$(PY) jobs/demo_pipeline.py

# The in-memory demo (no Ray, no storage): ATS-6 vs U-6 on a generated bars task (~40 s).
demo-memory: $(STAMP)
	$(PY) jobs/demo.py

bench: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/estimator_variance.py --threads 1
	PYTHONPATH=. $(PY) benchmarks/estimator_cost.py
	PYTHONPATH=. $(PY) benchmarks/estimator_training.py --threads 1
	PYTHONPATH=. $(PY) benchmarks/io_patches.py
	PYTHONPATH=. $(PY) benchmarks/cost_vs_size.py --json .gats/bench/cost_vs_size.json
	PYTHONPATH=. $(PY) benchmarks/io_training.py
	PYTHONPATH=. $(PY) benchmarks/scaling.py
	PYTHONPATH=. $(PY) benchmarks/accuracy_mnist.py
	PYTHONPATH=. $(PY) benchmarks/predict_speed.py
	PYTHONPATH=. $(PY) benchmarks/integrity.py
	PYTHONPATH=. $(PY) benchmarks/reliability_s3.py
	PYTHONPATH=. $(PY) benchmarks/nested_cost.py
	PYTHONPATH=. $(PY) benchmarks/nested_learning.py --budget-s 360 --eval-every-s 30 --seeds 0 1

clean:
	rm -rf $(VENV) build *.egg-info
