# Two entry points on a fresh machine: `make demo` and `make test` (more: eval, bench,
# gpu-check, mutants).
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A CUDA build of torch, so that the CUDA sources compile and link even without a GPU.
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0+PTX
PYTEST_ARGS ?=
EVAL_ARGS ?=

.PHONY: test demo eval bench build bench-cpu gpu-check clean mutants

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -qq "$(TORCH_SPEC)"
	# pyproject.toml is the one list: build requirements, dependencies and the dev extra.
	$(PY) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); p = d["project"]; \
		print("\n".join(d["build-system"]["requires"] + p["dependencies"] + p["optional-dependencies"]["dev"]))' \
		> $(VENV)/requirements.txt
	$(PIP) install -qq -r $(VENV)/requirements.txt
	touch $@

build: $(VENV)/.deps
	$(PIP) install -qq --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/proxykern demo

# The eval extra of pyproject.toml (lm-eval), then the trio's lm-eval table (base / expert / proxy).
$(VENV)/.eval-deps: $(VENV)/.deps
	$(PY) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); \
		print("\n".join(d["project"]["optional-dependencies"]["eval"]))' > $(VENV)/requirements-eval.txt
	$(PIP) install -qq -r $(VENV)/requirements-eval.txt
	touch $@

eval: build $(VENV)/.eval-deps
	$(PY) examples/trio/lm_eval/run_eval.py $(EVAL_ARGS)

bench: build
	$(VENV)/bin/proxykern bench kernel

bench-cpu: build
	$(PY) -m pytest benchmarks/test_bench_cpu.py -q --benchmark-columns=median,iqr,rounds \
		--benchmark-group-by=param:vocab,param:batch,param:top_p

# On a GPU machine with its own torch/triton/pytest (no venv, no network): builds the
# extension in place and runs the checks of benchmarks/gpu_check.py, logs and tables
# under $GPU_CHECK_OUT, else $OUT, else gpu-check-out/. GPU_CHECK_ARGS=--dry-run on CPU.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Mutation check (not in CI; before a release): small plausible bugs the suite must catch.
mutants: build
	$(PY) tests/mutants.py $(MUTANTS_ARGS)

clean:
	rm -rf build *.egg-info proxykern/_C*.so
