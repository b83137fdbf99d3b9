# finemed: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
DEMO_DIR ?= build/demo

# Torch first, so that the package's `torch>=2.4` floor is already met and pip pulls nothing else.
# Without an NVIDIA GPU take the CPU build (2.13.0 lies on these machines as a local wheel; elsewhere pass
# TORCH_PIP_ARGS pointing at PyTorch's CPU wheel index). With a GPU take the registry's CUDA build.
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_NVIDIA),1)
TORCH_SPEC ?= torch>=2.4
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_PIP_ARGS ?=

.PHONY: setup demo test test-slow test-cuda bench bench-gpu lint clean

setup: $(VENV)/.finemed-installed

# With an NVIDIA GPU, llama.cpp is built with CUDA (generation, chat and K-quants on the GPU; without it `auto`
# compares transformers on the GPU with llama.cpp on the CPU). PyPI has no CUDA wheel, so it is compiled.
ifeq ($(HAS_NVIDIA),1)
LLAMA_CUDA_CMAKE := -DGGML_CUDA=on
LLAMA_CPP_CUDA := CMAKE_ARGS="$(LLAMA_CUDA_CMAKE)" FORCE_CMAKE=1
endif

$(VENV)/.finemed-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
ifeq ($(HAS_NVIDIA),1)
	@echo "NVIDIA GPU found: building llama-cpp-python with CUDA (GGML_CUDA=on; several minutes)"
	$(LLAMA_CPP_CUDA) $(BIN)/python -m pip install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python>=0.3.36"
endif
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# A CPU whose AMX faults (some VMs) crashes llama.cpp's native build: checked, rebuilt without AMX.
	@args=$$(sh scripts/llama_cpp_cpu_args.sh $(BIN)/python); if [ -n "$$args" ]; then \
		echo "llama.cpp's native build crashes on this CPU's AMX: rebuilding llama-cpp-python without it (several minutes)"; \
		CMAKE_ARGS="$$args $(LLAMA_CUDA_CMAKE)" FORCE_CMAKE=1 $(BIN)/python -m pip install -q --no-cache-dir --force-reinstall --no-deps \
			--no-binary llama-cpp-python "llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')"; \
	fi
	touch $@

demo: setup
	$(BIN)/finemed index build examples/corpus.jsonl -o $(DEMO_DIR)/corpus.index
	rm -f $(DEMO_DIR)/answers.jsonl
	$(BIN)/finemed answer examples/questions.jsonl -o $(DEMO_DIR)/answers.jsonl \
		--index $(DEMO_DIR)/corpus.index --limit 3 --max-new-tokens 160 --print

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-cuda: setup
	$(BIN)/python -m pytest -q -m cuda

bench: setup
	$(BIN)/python bench/ttt.py
	$(BIN)/python bench/generate.py

# Everything that needs a CUDA GPU, in one command (after `make setup EXTRAS=dev,gpu`), under 8 minutes on one
# H100/H200: CUDA and compiled kernel tests, kernel and batched-TTT benchmarks, unsloth QLoRA, FSDP, llama.cpp
# offload; a pass/fail table at the end, results under bench/results/ (`--dry-run` lists the steps).
bench-gpu: setup
	$(BIN)/python bench/gpu_acceptance.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache
