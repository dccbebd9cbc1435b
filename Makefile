# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A CUDA build of torch, so that the CUDA sources compile and link even without a GPU.
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
PYTEST_ARGS ?=

.PHONY: test demo bench build bench-cpu clean

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

bench: build
	$(VENV)/bin/proxykern bench kernel

bench-cpu: build
	$(PY) -m pytest benchmarks/test_bench_cpu.py -q --benchmark-columns=median,iqr,rounds \
		--benchmark-group-by=param:vocab,param:batch,param:top_p

clean:
	rm -rf build *.egg-info proxykern/_C*.so
